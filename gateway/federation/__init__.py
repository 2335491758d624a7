"""Federated learning over Flower, for the gateways and their aggregator.

The gateway's ClientApp, the aggregator's ServerApp, and the Flower-free parts
they share: update bounds, model versions, the gateway's federation log. See
docs/federation.md for a fleet set-up.
"""
