"""The path a RefCOCO run takes, on a REFER-format fixture with the unc splits (train, val, testA,
testB) and the tiny model: best.pt is chosen on val only, the test splits are read once by the final
report (under "test"), both protocols; optimizer groups as documented; images that do not match
their instances.json size are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crformer import train
from crformer.config import load_config
from crformer.data.dataset import RefDataset
from crformer.data.refer import REFER
from crformer.errors import UserError
from crformer.process import run
from tests.fixtures_refer import make_refer_fixture
from tests.helpers import TINY_MODEL
from tests.helpers import python_m as run_module

NOT_FOR_REFER = ("data.synthetic", "train.batch_size", "eval.batch_size")


def refer_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [o for o in TINY_MODEL if not o.startswith(NOT_FOR_REFER)] + [
        "data.dataset=refcoco", f"data.root={root}", "data.split_by=unc", "data.val_splits=[val]",
        "data.test_splits=[testA,testB]", "train.batch_size=2", "eval.batch_size=4", "train.epochs=3",
        "train.warmup_iters=1", "eval.language_check=false", f"train.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    make_refer_fixture(str(root), "refcoco")
    return root


def test_selection_never_reads_a_test_split(refer_root, tmp_path, monkeypatch):
    import crformer.train as train_module

    phase, reads = ["fit"], []
    real_evaluate_split, real_final_report = train_module.evaluate_split, train_module.Trainer.final_report

    def recording_evaluate_split(model, refer, split, *a, **k):
        reads.append((phase[0], split))
        return real_evaluate_split(model, refer, split, *a, **k)

    def final_report(self):
        phase[0] = "final"
        return real_final_report(self)

    monkeypatch.setattr(train_module, "evaluate_split", recording_evaluate_split)
    monkeypatch.setattr(train_module.Trainer, "final_report", final_report)
    run(train.main, refer_args(refer_root, tmp_path / "run"))
    assert [s for p, s in reads if p == "fit"] == ["val"] * 3  # one selection per epoch, on val only
    assert [s for p, s in reads if p == "final"] == ["val", "testA", "testB"]


def test_train_then_evaluate_on_refer_unc(refer_root, tmp_path):
    out = tmp_path / "run"
    def python_m(*args):
        proc = run_module(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    text = python_m("crformer.train", *refer_args(refer_root, out, "eval.protocol=lavt"))
    validation, test = text.split("\nvalidation (")[1].split("\ntest (")
    assert "val (S×S)" in validation and "testA" not in validation and "testB" not in validation
    assert "testA (S×S)" in test and "testB (S×S)" in test and "best checkpoint" in test
    history = torch.load(out / "best.pt", weights_only=True)["history"]
    assert history and all(set(h["val"]) == {"val"} for h in history)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(set(r["val"]) == {"val"} for r in logged if "val" in r)
    assert set(json.loads((out / "metrics.json").read_text())) == {"val", "testA", "testB"}
    for protocol, lavt_rows in (("original", False), ("lavt", True)):
        table = python_m("crformer.evaluate", "--checkpoint", str(out / "best.pt"), "--split", "testA,testB",
                         "--protocol", protocol, "--out", str(tmp_path / f"{protocol}.json"))
        assert "testA" in table and "testB" in table and ("testA (S×S)" in table) == lavt_rows
        res = json.loads((tmp_path / f"{protocol}.json").read_text())
        assert res["protocol"] == protocol and set(res["results"]) == {"testA", "testB"}


def test_a_test_split_cannot_also_select():
    with pytest.raises(UserError, match="testA"):
        load_config(None, ["data.val_splits=[val,testA]", "data.test_splits=[testA]"])


def test_optimizer_groups_follow_the_readme():
    from crformer.models import build_model
    from crformer.train import param_groups

    cfg = load_config(None, TINY_MODEL + ["model.text_finetune=true", "train.lr=1e-3", "train.backbone_lr=1e-4",
                                          "train.text_lr=1e-5", "train.weight_decay=0.05"])
    model = build_model(cfg)
    where = {id(p): g for g in param_groups(model, cfg) for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(where) == sum(p.requires_grad for p in named.values())
    lr = {n: where[id(p)]["lr"] for n, p in named.items()}
    decay = {n: where[id(p)]["weight_decay"] for n, p in named.items()}
    for n in named:
        expected_lr = 1e-4 if n.startswith("backbone.swin.") else 1e-5 if n.startswith("text_encoder.") else 1e-3
        assert lr[n] == expected_lr, n
    assert any(n.startswith("backbone.vlf.") for n in named)  # the new VLF modules train at train.lr
    for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert decay[f"text_encoder.bert.embeddings.{n}.weight"] == 0.0
    no_decay = [n for n in named if n.endswith(".bias") or ".norm" in n or "LayerNorm" in n
                or "relative_position_bias_table" in n or "query_pos" in n or "slots" in n]
    assert no_decay and all(decay[n] == 0.0 for n in no_decay)
    assert decay["backbone.vlf.0.attn.q_proj.weight"] == 0.05
    assert decay["text_encoder.bert.encoder.layer.0.attention.self.query.weight"] == 0.05


def test_an_image_of_another_size_than_instances_json_is_refused(tmp_path):
    fx = make_refer_fixture(str(tmp_path), "refcoco")
    path = fx["image_paths"][1]  # instances.json: 40 wide, 30 high
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(path)  # transposed on disk
    ds = RefDataset(REFER(str(tmp_path), "refcoco", "unc"), "train", 32, train=True, preload=False)
    with pytest.raises(UserError, match="COCO_train2014_000000000001.png decodes to 30×40"):
        [ds[i] for i in range(len(ds))]


def test_exif_rotation_counts_when_sizes_are_compared(tmp_path):
    fx = make_refer_fixture(str(tmp_path), "refcoco")
    path = Path(fx["image_paths"][1]).with_suffix(".jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: stored 40×30 shows as 30×40
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path, exif=exif)
    os.replace(path, fx["image_paths"][1])  # same name as instances.json gives; PIL reads by content
    ds = RefDataset(REFER(str(tmp_path), "refcoco", "unc"), "train", 32, train=True, preload=True)
    with pytest.raises(UserError, match="after EXIF orientation"):
        [ds[i] for i in range(len(ds))]
