"""iomt-gateway: the edge agent for medical IoT wearables and room sensors."""

__version__ = "0.1.0"
