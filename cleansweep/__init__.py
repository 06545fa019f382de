"""cleansweep: can this backdoored CLIP model be cleaned, and with which hyperparameters?"""

__version__ = "0.1.0"
