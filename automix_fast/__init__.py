"""automix-fast: AutoMix (a learned per-pixel mixup) made fast.

Importing the package does no work and queries no device; submodules are imported on use.
"""
__version__ = "0.1.0"
