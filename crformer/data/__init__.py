"""Data: REFER-format reader, synthetic generator, datasets."""

from __future__ import annotations

from crformer.errors import UserError


def open_refer(cfg: dict, generate: bool = True):
    """The REFER dataset named by ``cfg['data']``. For ``synthetic`` with no root, the embedded
    dataset is generated into ``data.cache_dir`` on first use (deterministic from its seed)."""
    from crformer.data.refer import REFER
    from crformer.data.synthetic import ensure_synthetic

    d = cfg["data"]
    root = d["root"]
    if root is None:
        if d["dataset"] != "synthetic":
            raise UserError(f"data.root is required for dataset {d['dataset']!r} (the folder holding "
                            f"{d['dataset']}/ and images/)")
        if not generate:
            raise UserError("data.root is not set")
        root = ensure_synthetic(d["cache_dir"], **d["synthetic"])
    return REFER(str(root), d["dataset"], d["split_by"], d["image_dir"])
