"""Bad input against the real CLIs, hostile files, and interrupted runs.

Every user error: exit status 2, exactly one line on stderr, no traceback, found before any work,
and no output file changed. Hostile files (pickles that would run code) are refused before anything
in them runs. Interrupted checkpoint writes leave nothing behind and resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crformer import train
from crformer.checkpoint import load_checkpoint, save_atomic, tensor_digest
from crformer.config import load_config
from crformer.errors import UserError
from crformer.process import run
from tests.helpers import REPO, TINY_MODEL, png_header_only, train_losses
from tests.helpers import python_m as run_module

def python_m(module: str, *args: str, warnings: str = "ignore", peak_file: Path | None = None) -> subprocess.CompletedProcess:
    return run_module(f"crformer.{module}", *args, timeout=300, warnings=warnings, peak_file=peak_file)


#: A refused input costs what starting the command costs: a table row's process stays under this
#: (≈ 0.5 GB is the tiny commands' usual peak; the 6 GB alias bomb or a 10¹⁰-byte RLE decode would not).
REFUSAL_PEAK_MIB = 1500


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its size and content hash (what 'unchanged' means)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_args(cache: str, out: Path, *extra: str) -> list[str]:
    return TINY_MODEL + [f"data.cache_dir={cache}", f"train.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_cache):
    """A workspace: a finished tiny run, an image, a junk file, a text-encoder folder without weights."""
    ws = tmp_path_factory.mktemp("world")
    run(train.main, tiny_args(data_cache, ws / "run", "train.epochs=1", "eval.language_check=false"))
    Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)).save(ws / "img.png")
    (ws / "junk.bin").write_bytes(b"\x00\x01 not a torch file")
    (ws / "a_file").write_text("not a folder")
    (ws / "bert").mkdir()
    (ws / "bert" / "config.json").write_text("{}")
    hostile_files(ws)
    return {"dir": ws, "cache": data_cache, "ckpt": str(ws / "run" / "best.pt"), "last": str(ws / "run" / "last.pt"),
            "img": str(ws / "img.png")}


#: One REFER dataset per defect under {ws}/bad: (name, change to the valid ref, change to instances).
BAD_DATASETS = {
    "poly3": (None, {"segmentation": [[1, 2, 3]]}),
    "poly7": (None, {"segmentation": [[1, 1, 9, 1, 9, 9, 1]]}),
    "polynan": (None, {"segmentation": [[float("nan"), 1, 9, 1, 9, 9]]}),
    "poly1e30": (None, {"segmentation": [[1e30, 1, 9, 1, 9, 9]]}),
    "rle2p33": (None, {"segmentation": {"size": [30, 40], "counts": [2**33]}}),
    "rlesize": (None, {"segmentation": {"size": [40, 30], "counts": [1200]}}),
    "otherimage": ({"image_id": 2}, None),
    "refidabc": ({"ref_id": "abc"}, None),
    "hugeimage": (None, {"image": {"height": 100000, "width": 100000}}),
    "imagesstr": (None, {"images": "abc"}),
    "dotdot": (None, {"image": {"file_name": "../../a.png"}}),
    "noimage": (None, {"image": {"file_name": "missing.png"}}),
    "emptyimage": (None, {"image": {"file_name": "empty.png"}}),
    "sizeoff": (None, {"image": {"height": 31}}),
}


def bad_refer(root: Path, name: str, ref_change: dict | None, inst_change: dict | None) -> None:
    from crformer.data.refer import write_refer

    images = [{"id": 1, "file_name": "a.png", "height": 30, "width": 40},
              {"id": 2, "file_name": "a.png", "height": 30, "width": 40}]
    ann = {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]]}
    ref = {"ref_id": 1, "ann_id": 7, "image_id": 1, "split": "train",
           "sentences": [{"sent_id": 1, "raw": "the box", "sent": "the box", "tokens": ["the", "box"]}]}
    inst_change = dict(inst_change or {})
    images[0].update(inst_change.pop("image", {}))
    ann.update({k: inst_change.pop(k) for k in ("segmentation",) if k in inst_change})
    ref.update(ref_change or {})
    write_refer(str(root), name, "unc", [ref], {"images": images, "annotations": [ann], "categories": [],
                                                **inst_change})
    image_dir = root / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30)).save(image_dir / "a.png")
    (image_dir / "empty.png").write_bytes(b"")


def deep_pickle(depth: int) -> bytes:
    """A pickle of lists nested ``depth`` deep, written opcode by opcode (pickle.dumps itself would
    recurse too deep)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def hostile_files(ws: Path) -> None:
    """Configs, data, checkpoints, images and text-encoder folders that must each end in one line."""
    (ws / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                                  "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n")
    (ws / "dupkey.yaml").write_text("train:\n  epochs: 2\n  epochs: 3\n")
    (ws / "dupsection.yaml").write_text("train:\n  epochs: 2\nmodel:\n  lrm: true\ntrain:\n  lr: 0.1\n")
    (ws / "latin1.yaml").write_bytes("train:\n  out_dir: caf\xe9\n".encode("latin-1"))
    (ws / "inf.yaml").write_text("train:\n  lr: .inf\n")
    os.mkfifo(ws / "fifo")
    os.symlink("/dev/full", ws / "full.png")  # an output name that leads to a device
    png_header_only(ws / "huge.png", 100000, 100000)
    bad = ws / "bad"
    for name, (ref_change, inst_change) in BAD_DATASETS.items():
        bad_refer(bad, name, ref_change, inst_change)
    bad_refer(bad, "deeprefs", None, None)
    (bad / "deeprefs" / "refs(unc).p").write_bytes(deep_pickle(10000))
    for data_file in ("instances.json", "refs(unc).p"):  # a data file that is a FIFO would block the read
        folder = f"fifo{data_file[:4]}"
        bad_refer(bad, folder, None, None)
        (bad / folder / data_file).unlink()
        os.mkfifo(bad / folder / data_file)
    ckpt = torch.load(ws / "run" / "best.pt", weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    variants = {
        "corrupt": lambda c: c["model"][name].view(-1)[0].add_(1.0),
        "nan": lambda c: (c["model"][name].view(-1)[0].fill_(float("nan")),
                          c.update(model_digest=tensor_digest(c["model"]))),
        "cfgstr": lambda c: c.update(config="abc"),
        "noopt": lambda c: c.pop("optimizer"),
        "stepabc": lambda c: c.update(step="abc"),
        "bigeval": lambda c: c["config"]["data"]["synthetic"].update(eval_samples=50000),
    }
    for variant, change in variants.items():
        c = torch.load(ws / "run" / "best.pt", weights_only=True)
        change(c)
        torch.save(c, ws / f"{variant}.pt")
    from crformer.text_folder import resolve_text_encoder_path

    minilm = resolve_text_encoder_path("minilm")
    (ws / "automap").mkdir()
    (ws / "automap" / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "x.Y"}}))
    (ws / "automap" / "model.safetensors").write_bytes(b"")
    (ws / "picklebin").mkdir()
    for f in minilm.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, ws / "picklebin" / f.name)
    torch.save({"embeddings.word_embeddings.weight": Payload(ws / "EXECUTED")}, ws / "picklebin" / "pytorch_model.bin")


T, P, E = "train", "predict", "evaluate"
#: Train on a one-ref dataset of {ws}/bad (BAD_DATASETS) instead of the synthetic one.
REFER_TRAIN = ["data.split_by=unc", "data.train_split=train", "data.val_splits=[train]", "train.batch_size=1"]
# (family, cli, arguments with {ws} {ck} {last} {img} {cache} filled in, text the line must hold)
BAD_INPUT = [
    ("config range", T, ["train.epochs=0"], "train.epochs"),
    ("config range", T, ["train.batch_size=-4"], "train.batch_size"),
    ("config range", T, ["train.batch_size=0"], "train.batch_size"),
    ("config range", T, ["train.lr=-0.1"], "train.lr"),
    ("config range", T, ["data.image_size=50"], "data.image_size"),
    ("config range", T, ["model.num_queries=0"], "model.num_queries"),
    ("config range", T, ["data.max_tokens=1"], "data.max_tokens"),
    ("config range", T, ["train.num_threads=-2"], "train.num_threads"),
    ("config range", T, ["data.num_workers=-1"], "data.num_workers"),
    ("config range", T, ["eval.batch_size=0"], "eval.batch_size"),
    ("config type", T, ["train.epochs=two"], "train.epochs"),
    ("config type", T, ["model.calibration=maybe"], "model.calibration"),
    ("config choice", T, ["eval.protocol=bogus"], "eval.protocol"),
    ("config choice", T, ["train.amp=fp8"], "train.amp"),
    ("config split", T, ["data.val_splits=[val_easy,'']"], "data.val_splits"),
    ("config split", T, ["data.val_splits=[val_easy,val_nope]"], "val_nope"),
    ("config key", T, ["model.num_querys=3"], "model.num_querys"),
    ("override yaml", T, ["train.amp=[bf16"], "not valid YAML"),
    ("override form", T, ["train.epochs"], "key=value"),
    ("out_dir", T, ["train.out_dir={ws}/a_file/run"], "a_file"),
    ("text encoder", T, ["model.text_encoder={ws}/bert"], "no weights"),
    ("backbone weights", T, ["model.backbone.weights={ws}/junk.bin"], "junk.bin"),
    ("backbone weights", T, ["model.backbone.weights={ws}/missing.pth"], "missing.pth"),
    ("resume", T, ["--resume", "{last}"], "finished run"),
    ("resume", T, ["--resume", "{ws}/junk.bin"], "junk.bin"),
    ("resume", T, ["--resume", "{last}", "--config", "configs/refcoco_swinb.yaml"], "--config"),
    ("usage", T, ["--bogus-flag"], "unrecognized arguments"),
    ("device", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "the star", "--device", "cuda:99"], "cuda:99"),
    ("device", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "the star", "--device", "gpu0"], "gpu0"),
    ("output", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "the star", "--out", "{img}"], "overwrite"),
    ("output", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "the star", "--out", "{ws}/a_file/o.png"],
     "a_file"),
    ("output", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "the star", "--out", "{ws}/o.gif"], ".png"),
    ("image", P, ["--checkpoint", "{ck}", "--image", "{ws}/none.png", "--text", "the star"], "none.png"),
    ("image", P, ["--checkpoint", "{ck}", "--image", "{ws}/junk.bin", "--text", "the star"], "junk.bin"),
    ("sentence", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "   "], "empty sentence"),
    ("checkpoint", P, ["--checkpoint", "{ws}/none.pt", "--image", "{img}", "--text", "the star"], "none.pt"),
    ("checkpoint", P, ["--checkpoint", "{ws}/junk.bin", "--image", "{img}", "--text", "the star"], "junk.bin"),
    ("model size", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "the star", "model.d_model=64"],
     "shapes differ"),
    ("usage", E, ["--checkpoint", "{ck}", "--protocol", "bogus"], "invalid choice"),
    ("evaluate", E, ["--checkpoint", "{ck}", "--save-vis", "-1"], "--save-vis"),
    ("evaluate", E, ["--checkpoint", "{ck}", "--split", "val_easy,"], "empty split name"),
    ("evaluate", E, ["--checkpoint", "{ck}", "--split", "val_nope"], "val_nope"),
    ("evaluate", E, ["--checkpoint", "{ck}", "--out", "{ws}/a_file/e.json"], "a_file"),
    ("evaluate", E, ["--checkpoint", "{ck}", "eval.batch_size=0"], "eval.batch_size"),
    ("device", E, ["--checkpoint", "{ck}", "--device", "cuda:99"], "cuda:99"),
    # Harmful or hanging: bounded before the work starts.
    ("yaml aliases", T, ["--config", "{ws}/bomb.yaml"], "aliases"),
    ("yaml aliases", T, ["train.amp=&a [x]"], "aliases"),
    ("huge value", T, ["train.amp=" + "x" * 100000], "train.amp"),
    ("huge value", T, ["x" * 100000 + "=1"], "unknown config key"),
    ("generate", T, ["data.synthetic.train_images=100000000"], "data.synthetic.train_images"),
    ("generate", E, ["--checkpoint", "{ws}/bigeval.pt"], "data.synthetic.eval_samples=50000"),
    ("huge image", P, ["--checkpoint", "{ck}", "--image", "{ws}/huge.png", "--text", "x"], "limit"),
    ("huge image", T, ["data.root={ws}/bad", "data.dataset=hugeimage", *REFER_TRAIN], "limit"),
    ("fifo", P, ["--checkpoint", "{ck}", "--image", "{ws}/fifo", "--text", "x"], "not a regular file"),
    ("fifo", T, ["--config", "{ws}/fifo"], "not a regular file"),
    ("fifo", E, ["--checkpoint", "{ws}/fifo"], "not a regular file"),
    ("fifo", T, ["data.root={ws}/bad", "data.dataset=fifoinst", *REFER_TRAIN], "not a regular file"),
    ("fifo", T, ["data.root={ws}/bad", "data.dataset=fiforefs", *REFER_TRAIN], "not a regular file"),
    ("device output", P, ["--checkpoint", "{ck}", "--image", "{img}", "--text", "x", "--out", "{ws}/full.png"],
     "not a regular file"),
    # Silent wrong answers: refused.
    ("integrity", E, ["--checkpoint", "{ws}/corrupt.pt"], "corrupted"),
    ("integrity", P, ["--checkpoint", "{ws}/corrupt.pt", "--image", "{img}", "--text", "x"], "corrupted"),
    ("integrity", E, ["--checkpoint", "{ws}/nan.pt"], "non-finite"),
    ("integrity", P, ["--checkpoint", "{ws}/nan.pt", "--image", "{img}", "--text", "x"], "non-finite"),
    ("yaml duplicates", T, ["--config", "{ws}/dupkey.yaml"], "'epochs' is given twice"),
    ("yaml duplicates", T, ["--config", "{ws}/dupsection.yaml"], "'train' is given twice"),
    ("polygon", T, ["data.root={ws}/bad", "data.dataset=poly3", *REFER_TRAIN], "odd number"),
    ("polygon", T, ["data.root={ws}/bad", "data.dataset=poly7", *REFER_TRAIN], "odd number"),
    ("ref", T, ["data.root={ws}/bad", "data.dataset=otherimage", *REFER_TRAIN], "its annotation 7 is on image 1"),
    # Crashes and tracebacks: one line instead.
    ("polygon", T, ["data.root={ws}/bad", "data.dataset=polynan", *REFER_TRAIN], "not finite"),
    ("polygon", T, ["data.root={ws}/bad", "data.dataset=poly1e30", *REFER_TRAIN], "not finite"),
    ("rle", T, ["data.root={ws}/bad", "data.dataset=rle2p33", *REFER_TRAIN], "RLE counts"),
    ("refs", T, ["data.root={ws}/bad", "data.dataset=deeprefs", *REFER_TRAIN], "deeper"),
    ("refs", T, ["data.root={ws}/bad", "data.dataset=refidabc", *REFER_TRAIN], "ref_id must be an integer"),
    ("instances", T, ["data.root={ws}/bad", "data.dataset=imagesstr", *REFER_TRAIN], "'images' must be a list"),
    ("instances", T, ["data.root={ws}/bad", "data.dataset=dotdot", *REFER_TRAIN], "relative path"),
    ("config value", T, ["train.lr=.inf"], "train.lr"),
    ("config value", T, ["--config", "{ws}/inf.yaml"], "train.lr"),
    ("config value", T, ["train.out_dir=" + "d" * 5000], "train.out_dir"),
    ("config file", T, ["--config", "{ws}/latin1.yaml"], "not UTF-8"),
    ("checkpoint", E, ["--checkpoint", "{ws}/cfgstr.pt"], "'config' is not a config"),
    ("resume", T, ["--resume", "{ws}/noopt.pt"], "no 'optimizer' entry"),
    ("resume", T, ["--resume", "{ws}/stepabc.pt"], "'step' must be an integer"),
    ("text encoder", T, ["model.text_encoder={ws}/automap"], "its own code"),
    ("text encoder", T, ["model.text_encoder={ws}/picklebin"], "cannot load the text encoder weights"),
    ("cache", T, ["data.cache_dir={ws}/a_file/cache"], "data.cache_dir"),
    # Late: found before the first step.
    ("images up front", T, ["data.root={ws}/bad", "data.dataset=noimage", *REFER_TRAIN], "image not found"),
    ("images up front", T, ["data.root={ws}/bad", "data.dataset=emptyimage", *REFER_TRAIN], "empty.png"),
    ("images up front", T, ["data.root={ws}/bad", "data.dataset=sizeoff", *REFER_TRAIN], "says 40×31"),
    ("rle", T, ["data.root={ws}/bad", "data.dataset=rlesize", *REFER_TRAIN], "RLE size"),
]


@pytest.mark.parametrize("family,cli,args,needle", BAD_INPUT,
                         ids=[f"{c}-{f}-{i}" for i, (f, c, _, _) in enumerate(BAD_INPUT)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, family, cli, args, needle):
    ws = world["dir"]
    fill = dict(ws=ws, ck=world["ckpt"], last=world["last"], img=world["img"])
    argv = [a.format(**fill) for a in args]
    if cli == T and not any(a.startswith("--resume") for a in argv):
        argv = tiny_args(world["cache"], ws / "run2") + argv  # later arguments win
    before, home_before = snapshot(ws), snapshot(Path(os.environ["HOME"]))
    peak = ws.parent / f"peak-{os.getpid()}.txt"
    peak.unlink(missing_ok=True)
    proc = python_m(cli, *argv, peak_file=peak)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in proc.stderr and needle in err[0], err[0]
    assert len(err[0]) < 400, err[0][:600]
    assert snapshot(ws) == before
    assert snapshot(Path(os.environ["HOME"])) == home_before  # the data cache in HOME included
    assert not (ws / "EXECUTED").exists()
    assert not (ws / "run2").exists()
    if peak.exists():
        assert int(peak.read_text().split()[-1]) / 1024 < REFUSAL_PEAK_MIB


def test_every_config_key_is_checked():
    from crformer.config import RULES, _leaves

    assert {k for k, _ in _leaves(load_config())} == set(RULES)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"model": {}, "config": {}, "step": 1}, path)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="disk full; the previous last.pt is intact"):
        save_atomic({"model": {}, "config": {}, "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoints_get_the_permissions_of_the_other_outputs(world):
    run_dir = world["dir"] / "run"
    modes = {name: stat.S_IMODE(os.stat(run_dir / name).st_mode) for name in ("last.pt", "best.pt", "config.json")}
    assert len(set(modes.values())) == 1, modes


def test_sentences_without_words_warn(world):
    from crformer.data.tokenizer import SentenceTokenizer

    tok = SentenceTokenizer("minilm", 20)
    for sentence in ["🙂🙂🙂", "\u200b\u200b", "?!...", "🙂 ,"]:
        with pytest.warns(UserWarning, match="no word tokens"):
            tok([sentence])
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        tok(["the red 🙂 square", "a"])


def test_predict_warns_once_when_the_sentence_has_no_words(world, tmp_path):
    proc = python_m(P, "--checkpoint", world["ckpt"], "--image", world["img"], "--text", "🙂🙂",
                    "--out", str(tmp_path / "o.png"), warnings="default")
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "no word tokens" in line]) == 1, proc.stderr


# ---------------------------------------------------------------- hostile files: nothing runs
class Payload:
    """Unpickling this calls os.system: the marker file appears if anything executes it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_files(folder: Path) -> dict:
    marker = folder / "EXECUTED"
    ckpt = {"model": Payload(marker), "config": {}}
    torch.save(ckpt, folder / "zip.pt")
    torch.save(ckpt, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "extra": Payload(marker)}, folder / "swin.pth")
    refs_root = folder / "refer"
    (refs_root / "refcoco").mkdir(parents=True)
    (refs_root / "refcoco" / "instances.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with open(refs_root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump([{"ref_id": 1, "payload": Payload(marker)}], f, protocol=2)
    return {"marker": marker, "refs_root": refs_root}


def test_payload_files_are_refused_and_never_run(world, tmp_path):
    files = payload_files(tmp_path)
    cases = [
        (P, ["--checkpoint", str(tmp_path / "zip.pt"), "--image", world["img"], "--text", "x"]),
        (E, ["--checkpoint", str(tmp_path / "legacy.pt")]),
        (T, ["--resume", str(tmp_path / "legacy.pt")]),
        (T, tiny_args(world["cache"], tmp_path / "r1", f"model.backbone.weights={tmp_path / 'swin.pth'}")),
        (T, tiny_args(world["cache"], tmp_path / "r2", "data.dataset=refcoco", f"data.root={files['refs_root']}")),
    ]
    for cli, argv in cases:
        proc = python_m(cli, *argv)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, (cli, argv, proc.stderr[-1500:])
        assert err[0].startswith("error: refusing to load") and "posix.system" in err[0], err[0]
        assert not files["marker"].exists(), (cli, argv)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_plain_pickle_is_one_line_without_torch_warning_or_advice(tmp_path, protocol):
    """A pickle that torch.save did not write: no torch warning about its protocol before the error,
    and the error names the file's problem, not torch's advice about torch.load's defaults."""
    import warnings

    from crformer.checkpoint import load_tensor_file

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UserError) as e:
        warnings.simplefilter("always")
        load_tensor_file(path, "checkpoint")
    assert caught == [], [str(w.message) for w in caught]
    assert str(e.value).startswith(f"cannot read checkpoint {path}: "), str(e.value)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value), str(e.value)  # torch's advice, not the problem


def test_old_checkpoints_with_numpy_rng_state_still_load(world, tmp_path):
    ckpt = load_checkpoint(world["last"])
    rng = ckpt["rng"][0]
    rng["numpy"] = np.random.get_state()  # the layout written before RNG states became tensors
    rng["python"] = tuple(rng["python"])
    torch.save(ckpt, tmp_path / "old.pt")
    assert isinstance(load_checkpoint(tmp_path / "old.pt")["rng"][0]["numpy"][1], np.ndarray)


# ---------------------------------------------------------------- interrupted runs
def test_kill_9_during_a_checkpoint_write_then_resume_exactly(world, tmp_path):
    base = [o for o in tiny_args(world["cache"], tmp_path / "x") if not o.startswith("train.out_dir")]
    base += ["train.epochs=2", "eval.language_check=false"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(train.main, base + [f"train.out_dir={full}", "train.max_steps=3"])
    run(train.main, base + [f"train.out_dir={part}", "train.max_steps=2"])
    # A second process writes a large checkpoint over part/last.pt and is killed mid-write.
    writer = subprocess.Popen([sys.executable, "-c", (
        "import torch; from crformer.checkpoint import save_atomic; "
        f"save_atomic({{'model': {{'w': torch.randn(2**27)}}, 'config': {{}}}}, {str(part / 'last.pt')!r})")],
        cwd=REPO)
    deadline = time.time() + 120
    while not list(part.glob(".last.pt.*.tmp")) and time.time() < deadline and writer.poll() is None:
        time.sleep(0.01)
    assert list(part.glob(".last.pt.*.tmp")), "the writer finished before it could be killed"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert list(part.glob(".last.pt.*.tmp")) and load_checkpoint(part / "last.pt")["step"] == 2
    run(train.main, ["--resume", str(part / "last.pt"), "train.max_steps=3"])
    assert not list(part.glob("*.tmp")) and not list(part.glob(".*.tmp"))
    assert load_checkpoint(part / "last.pt")["step"] == 3
    assert train_losses(part)[3] == pytest.approx(train_losses(full)[3], rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------- confinement and faults
def test_resume_and_evaluate_write_where_the_user_says_not_where_the_checkpoint_says(world, tmp_path):
    """A checkpoint handed over from elsewhere names its own out_dir and cache_dir: neither is written."""
    base = [o for o in tiny_args(world["cache"], tmp_path / "x") if not o.startswith("train.out_dir")]
    origin, its_cache = tmp_path / "origin", tmp_path / "origin_cache"
    run(train.main, base + [f"train.out_dir={origin}", f"data.cache_dir={its_cache}", "train.epochs=2",
                            "train.max_steps=1", "eval.language_check=false"])
    shutil.rmtree(its_cache)  # evaluate must generate the data into the user's cache, not re-create this
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(origin / "last.pt", moved / "last.pt")
    before = snapshot(origin)
    run(train.main, ["--resume", str(moved / "last.pt"), "train.max_steps=2"])
    assert snapshot(origin) == before
    assert load_checkpoint(moved / "last.pt")["step"] == 2 and (moved / "log.jsonl").is_file()
    from crformer import evaluate

    run(evaluate.main, ["--checkpoint", str(moved / "last.pt"), "--split", "val_easy", "--out",
                        str(moved / "e.json"), "eval.language_check=false"])
    assert snapshot(origin) == before and not its_cache.exists()
    assert json.loads((moved / "e.json").read_text())


def test_picture_names_from_split_names_stay_in_the_picture_folder(world, tmp_path):
    bad_refer(tmp_path / "data", "escape", {"split": "../../val"}, None)
    proc = python_m(E, "--checkpoint", world["ckpt"], "--split", "../../val", "--save-vis", "1",
                    "--out", str(tmp_path / "out" / "e.json"), f"data.root={tmp_path / 'data'}",
                    "data.dataset=escape", "data.split_by=unc")
    assert proc.returncode == 0, proc.stderr[-2000:]
    pictures = [p for p in tmp_path.rglob("*.png") if "images" not in p.parts]
    assert pictures and all(p.parent == tmp_path / "out" / "e_vis" for p in pictures), pictures


#: What each kind of write is asked to do past the file-size limit, and what it writes first.
WRITES = {
    "checkpoint": ("last.pt", "from crformer.checkpoint import save_atomic as w\n",
                   "w({'model': {'w': torch.zeros(1 << 22)}, 'step': 2}, PATH)"),
    "output file": ("e.json", "from crformer.files import write_bytes_atomic as w\n",
                    "w(PATH, b'x' * (1 << 22), 'evaluation results')"),  # evaluate/predict/config.json/metrics.json
    "log line": ("log.jsonl", "from crformer.files import append_line as w\n", "w(PATH, 'x' * (1 << 22), 'training log')"),
}


@pytest.mark.parametrize("kind", list(WRITES))
def test_a_failed_write_is_one_line_and_keeps_what_was_there(tmp_path, kind):
    """A real failed write, not a mock: the file-size limit makes write() fail with EFBIG as a full disk
    fails it with ENOSPC (torch's zip writer turns either into a RuntimeError, "unexpected pos")."""
    name, imports, call = WRITES[kind]
    path = tmp_path / name
    if kind == "checkpoint":
        save_atomic({"model": {}, "config": {}, "step": 1}, path)
    else:
        path.write_bytes(b'{"step": 1}\n')
    before = path.read_bytes()
    code = ("import resource, signal, torch\nfrom crformer.process import run\n" + imports +
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            f"run(lambda argv: {call.replace('PATH', repr(str(path)))})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("error: cannot write") and str(path) in err[0], err[0]
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left
    if kind == "log line":  # an append keeps the lines before it (the failed line may be cut)
        assert path.read_bytes().startswith(before)
    else:
        assert path.read_bytes() == before and f"the previous {name} is intact" in err[0], err[0]
        if kind == "checkpoint":
            assert load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("signals,status,last_line", [
    ((signal.SIGTERM,), 143, "terminated"),
    ((signal.SIGINT, signal.SIGINT), 130, "interrupted"),  # the second, 5 ms later, lands in the cleanup
], ids=["sigterm", "double-ctrl-c"])
def test_stop_signals_unwind_with_one_line(world, tmp_path, signals, status, last_line):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "crformer.train",
                             *tiny_args(world["cache"], out, "train.epochs=50", "train.checkpoint_every=1")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert err.strip().splitlines()[-1] == last_line and "Traceback" not in err, err[-2000:]
    assert not list(out.glob(".*.tmp"))
    assert load_checkpoint(out / "last.pt")["step"] >= 1


def test_checkpoints_carry_a_digest_of_their_weights(world):
    ckpt = load_checkpoint(world["ckpt"])
    assert ckpt["model_digest"] == tensor_digest(ckpt["model"])
    flipped = dict(ckpt["model"])
    name = next(iter(flipped))
    flipped[name] = flipped[name].clone().view(-1).add_(1).view(flipped[name].shape)
    assert tensor_digest(flipped) != ckpt["model_digest"]



class _CountingTokenizer:
    """A tokenizer that records the sentences it is asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, sentences, **kwargs):
        self.calls.append(list(sentences))
        return self.inner(sentences, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenizer_tokenises_each_sentence_once_and_gives_the_same_ids(monkeypatch):
    """Remembered ids equal a fresh tokenisation (repeats within a call, truncation included); a
    sentence's word check warns once; past MAX_CACHED the memory starts afresh without losing a row."""
    import warnings

    from crformer.data.tokenizer import SentenceTokenizer

    batch = ["the red square", "the leftmost circle of all the circles here", "the red square", "a"]
    tok = SentenceTokenizer("minilm", 6)
    tok.tokenizer = counting = _CountingTokenizer(tok.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning
        want = SentenceTokenizer("minilm", 6)(batch)
        got = [tok(batch), tok(batch[::-1])]
    assert counting.calls == [["the red square", "the leftmost circle of all the circles here", "a"]]
    for (ids, mask), flip in zip(got, (False, True)):
        ids, mask = (ids.flip(0), mask.flip(0)) if flip else (ids, mask)
        assert torch.equal(ids, want[0]) and torch.equal(mask, want[1])
    with pytest.warns(UserWarning, match="no word tokens"):
        tok(["🙂🙂"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["🙂🙂", "the red square"])
    monkeypatch.setattr(SentenceTokenizer, "MAX_CACHED", 3)
    ids, mask = tok(["the red square", "a blue star", "a green circle"])
    assert len(tok._rows) == 3 and torch.equal(ids[0], want[0][0]) and torch.equal(mask[0], want[1][0])
