"""cxr: train and serve the Attention-Guided CNN (AG-CNN) on NIH ChestX-ray14."""

__version__ = "0.1.0"
