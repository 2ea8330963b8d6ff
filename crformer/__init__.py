"""CRFormer: Calibration & Reconstruction for referring image segmentation."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import crformer` stays light (no torch/transformers) for the CLIs' argument parsing.
    if name == "Segmenter":
        from crformer.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'crformer' has no attribute {name!r}")
