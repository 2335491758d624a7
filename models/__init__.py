"""Model definitions for on-device learning (see models/README.md)."""
