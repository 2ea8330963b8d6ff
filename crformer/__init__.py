"""CRFormer: Calibration & Reconstruction for referring image segmentation."""

__version__ = "0.1.0"


def _link_kernels() -> None:
    """``kernels/`` sits at the repository root and is installed as ``crformer.kernels``. Older
    setuptools editable installs (a plain .pth to the root) lose that mapping; from a checkout,
    point the subpackage at the folder directly."""
    import importlib.util
    import os
    import sys

    if "crformer.kernels" in sys.modules:
        return
    root_kernels = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    try:
        found = importlib.util.find_spec("crformer.kernels") is not None
    except (ImportError, ValueError):
        found = False
    if not found and os.path.isfile(os.path.join(root_kernels, "__init__.py")):
        spec = importlib.util.spec_from_file_location("crformer.kernels", os.path.join(root_kernels, "__init__.py"),
                                                      submodule_search_locations=[root_kernels])
        module = importlib.util.module_from_spec(spec)
        sys.modules["crformer.kernels"] = module
        spec.loader.exec_module(module)


_link_kernels()


def __getattr__(name: str):
    # Lazy: `import crformer` stays light (no torch/transformers) for the CLIs' argument parsing.
    if name == "Segmenter":
        from crformer.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'crformer' has no attribute {name!r}")
