"""H-SAM: prompt-free hierarchical-decoding adaptation of SAM for medical image segmentation."""

__version__ = "0.1.0"
