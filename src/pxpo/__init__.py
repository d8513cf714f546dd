"""pxpo: pixel-wise policy optimisation for text-to-image diffusion models."""

__version__ = "0.1.0"
