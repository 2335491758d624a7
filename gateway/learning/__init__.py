"""On-device learning: the privacy account, DP-SGD rounds, the training child.

Only `gateway.learning.dpsgd` imports torch and opacus, and it runs in a child
process started by `gateway.learning.job`; the agent itself imports `privacy` and
`job` only.
"""
