"""p2pfleet: peer-to-peer volunteer computing for ML inference across parked, plugged-in vehicles."""

__version__ = "0.1.0"
