"""CRFormer model modules (docs/DESIGN.md §2)."""

from crformer.models.crformer import CRFormer, build_model

__all__ = ["CRFormer", "build_model"]
