"""The CLIs end to end on tiny sizes: train → evaluate → predict, exact resume, torchrun, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from crformer import evaluate, predict, train
from crformer.checkpoint import load_checkpoint, save_atomic
from crformer.process import run
from tests.helpers import REPO, TINY_MODEL, train_losses

def cli(main, argv, capsys=None):
    """Run a CLI main in-process the way ``python -m`` does (UserError → exit 2, one line)."""
    run(main, argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("trained")
    cli(train.main, TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={out}", "train.epochs=2"])
    return out


def test_train_writes_checkpoints_log_and_metrics(trained, capsys):
    for name in ("best.pt", "last.pt", "log.jsonl", "metrics.json", "config.json"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics) == {"val_easy", "val_hard"}
    hard = metrics["val_hard"]
    assert set(hard["by_kind"]) == {"two-attr", "superlative", "relational"}
    assert {"new_target_mIoU", "old_target_mIoU", "n"} <= set(hard["language_check"])
    for key in ("oIoU", "mIoU", "Prec@0.5", "Prec@0.9"):
        assert 0.0 <= hard["overall"][key] <= 1.0
    ckpt = load_checkpoint(trained / "last.pt")
    assert ckpt["step"] == ckpt["history"][-1]["step"] and ckpt["config"]["train"]["epochs"] == 2
    assert "version" in ckpt and ckpt["text_encoder"] == "minilm"
    # One file when the last epoch was the best (best.pt is written, last.pt linked to it), else two.
    best_is_last = load_checkpoint(trained / "best.pt")["step"] == ckpt["step"]
    assert os.path.samefile(trained / "best.pt", trained / "last.pt") == best_is_last
    assert not any(k.startswith("text_encoder.") for k in ckpt["model"])  # frozen encoder: by reference
    rec = [json.loads(l) for l in (trained / "log.jsonl").read_text().splitlines()]
    assert {"mask", "aux", "rec", "total", "lr", "images_per_s"} <= set(rec[0])


def test_evaluate_and_predict_need_only_the_checkpoint(trained, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    cli(evaluate.main, ["--checkpoint", str(trained / "best.pt"), "--split", "val_hard", "--protocol", "lavt",
                        "--save-vis", "2", "--language-check", "--out", str(out_json)])
    text = capsys.readouterr().out
    assert "oIoU" in text and "val_hard (S×S)" in text and "language check" in text
    res = json.loads(out_json.read_text())
    assert res["protocol"] == "lavt" and "lavt" in res["results"]["val_hard"]
    assert len(list((tmp_path / "eval_vis").glob("*.png"))) == 2
    img = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(img)
    cli(predict.main, ["--checkpoint", str(trained / "best.pt"), "--image", str(img), "--text", "the red square",
                       "--out", str(tmp_path / "o.png")])
    mask = np.asarray(Image.open(tmp_path / "o_mask.png"))
    assert mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(tmp_path / "o.png").size == (50, 40)


def test_resume_continues_exactly(tiny, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    base = [o for o in tiny if not o.startswith("train.out_dir")] + ["train.epochs=2"]
    cli(train.main, base + [f"train.out_dir={full}", "train.max_steps=5"])
    cli(train.main, base + [f"train.out_dir={part}", "train.max_steps=3"])  # stops mid-epoch 2
    assert load_checkpoint(part / "last.pt")["step"] == 3
    cli(train.main, ["--resume", str(part / "last.pt"), "train.max_steps=5"])
    a, b = train_losses(full), train_losses(part)
    assert set(a) == {1, 2, 3, 4, 5} and set(b) == {1, 2, 3, 4, 5}
    for step in (4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(3)}, "config": {}, "step": 1}, path)

    def killed(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"model": {}, "config": {}, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


@pytest.mark.parametrize("hard_links", [True, False])
def test_link_atomic_gives_a_second_name_that_later_writes_leave_alone(tmp_path, monkeypatch, hard_links):
    """best.pt and last.pt of an improving epoch are one file (or an atomic copy where the filesystem
    has no hard links); the next epoch's last.pt replaces only last.pt, and no temp file is left."""
    from crformer.files import link_atomic

    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    save_atomic({"model": {}, "config": {}, "step": 1}, last)
    save_atomic({"model": {}, "config": {}, "step": 2}, best)
    if not hard_links:
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    link_atomic(best, last, "checkpoint")
    assert load_checkpoint(last)["step"] == 2 and (os.path.samefile(best, last) == hard_links)
    save_atomic({"model": {}, "config": {}, "step": 3}, last)
    assert load_checkpoint(best)["step"] == 2 and load_checkpoint(last)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_torchrun_two_processes_gloo(tiny, tmp_path):
    out = tmp_path / "ddp"
    args = [o for o in tiny if not o.startswith("train.out_dir")] + [f"train.out_dir={out}", "train.epochs=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "crformer.train", *args], capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()


class Exited(Exception):
    """Stands in for os._exit, which never returns."""


@pytest.mark.parametrize("raised,status", [(None, 0), ("user", 2), (KeyboardInterrupt(), 130),
                                           ("terminated", 143), (RuntimeError("boom"), 1)])
def test_torchrun_worker_ends_with_its_status_without_finalization(raised, status, monkeypatch, capsys):
    from crformer import distributed, process
    from crformer.errors import UserError

    raised = {"user": UserError("bad value"), "terminated": process.Terminated()}.get(raised, raised)

    def main(argv):
        if raised is not None:
            raise raised

    def exit_now(code):
        raise Exited(code)

    monkeypatch.setattr(process.os, "_exit", exit_now)
    monkeypatch.setattr(distributed, "_joined", True)
    with pytest.raises(Exited) as e:
        run(main, [])
    assert e.value.args == (status,)
    if status == 1:  # an unexpected error still shows its traceback
        assert "RuntimeError: boom" in capsys.readouterr().err
    monkeypatch.setattr(distributed, "_joined", False)  # outside torchrun: a normal exit, no os._exit
    if raised is None:
        run(main, [])
    elif status == 1:
        with pytest.raises(RuntimeError):
            run(main, [])
    else:
        with pytest.raises(SystemExit) as e:
            run(main, [])
        assert e.value.code == status


# ---------------------------------------------------------------- bad input: one line, exit 2
def _user_error(main, argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        cli(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]


def test_bad_training_input(tiny, tmp_path, capsys):
    _user_error(train.main, tiny + ["model.num_querys=3"], capsys, "model.num_querys")
    _user_error(train.main, tiny + ["data.dataset=refcoco", f"data.root={tmp_path / 'nope'}"], capsys, "nope")
    (tmp_path / "root" / "refcoco").mkdir(parents=True)
    _user_error(train.main, tiny + ["data.dataset=refcoco", f"data.root={tmp_path / 'root'}"], capsys, "refs")
    _user_error(train.main, tiny + [f"model.text_encoder={tmp_path / 'bert'}"], capsys, "text encoder", "bert")
    _user_error(train.main, tiny + [f"model.backbone.weights={tmp_path / 'swin.pth'}"], capsys, "swin.pth")
    _user_error(train.main, tiny + ["--resume", str(tmp_path / "missing.pt")], capsys, "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01junk")
    _user_error(train.main, ["--resume", str(tmp_path / "junk.pt")], capsys, "junk.pt")


def test_bad_predict_input(trained, tmp_path, capsys):
    ck = str(trained / "best.pt")
    _user_error(predict.main, ["--checkpoint", ck, "--image", str(tmp_path / "no.png"), "--text", "x"], capsys, "no.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    _user_error(predict.main, ["--checkpoint", ck, "--image", str(bad), "--text", "x"], capsys, "bad.jpg")
    good = tmp_path / "g.png"
    Image.new("RGB", (20, 20)).save(good)
    _user_error(predict.main, ["--checkpoint", ck, "--image", str(good), "--text", "   "], capsys, "empty sentence")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16"])
def test_predict_converts_unusual_images(trained, tmp_path, mode):
    img = Image.new(mode, (24, 30))
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    cli(predict.main, ["--checkpoint", str(trained / "best.pt"), "--image", str(path), "--text", "the star",
                       "--out", str(tmp_path / "o.png")])
    assert np.asarray(Image.open(tmp_path / "o_mask.png")).shape == (30, 24)


def test_long_sentence_is_truncated_with_one_warning(trained, tmp_path):
    from crformer.data.tokenizer import SentenceTokenizer

    tok = SentenceTokenizer("minilm", 8)
    with pytest.warns(UserWarning, match="truncated") as rec:
        ids, mask = tok(["the small red square left of the big blue star above the green circle"] * 2)
        tok(["another very long sentence that goes on and on and on and on"])
    assert len(rec) == 1 and ids.shape == (2, 8) and mask.all()
