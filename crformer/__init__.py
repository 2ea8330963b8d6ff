"""CRFormer: Calibration & Reconstruction for referring image segmentation."""

__version__ = "0.1.0"
