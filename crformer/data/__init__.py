"""Data: REFER-format and Hugging Face parquet readers, synthetic generator, datasets."""

from __future__ import annotations

from crformer.errors import UserError


def open_refer(cfg: dict, generate: bool = True):
    """The dataset named by ``cfg['data']``: a :class:`~crformer.data.refer.REFER` folder, or with
    ``data.format: hf-parquet`` a Hugging Face release (:class:`~crformer.data.hf_parquet.HFParquet`).
    For ``synthetic`` with no root, the embedded dataset is generated into ``data.cache_dir`` on first
    use (deterministic from its seed)."""
    d = cfg["data"]
    root = d["root"]
    if d["format"] == "hf-parquet":
        from crformer.data.hf_parquet import HFParquet

        if root is None:
            raise UserError("data.root is required with data.format=hf-parquet (the downloaded dataset folder "
                            "holding data/<split>-*.parquet)")
        return HFParquet(str(root), d["image_dir"])

    from crformer.data.refer import REFER
    from crformer.data.synthetic import ensure_synthetic

    if root is None:
        if d["dataset"] != "synthetic":
            raise UserError(f"data.root is required for dataset {d['dataset']!r} (the folder holding "
                            f"{d['dataset']}/ and images/)")
        if not generate:
            raise UserError("data.root is not set")
        root = ensure_synthetic(d["cache_dir"], **d["synthetic"])
    return REFER(str(root), d["dataset"], d["split_by"], d["image_dir"])
