"""`python -m gateway` runs the command line."""

from gateway.cli import console_main

console_main()
