"""The training step: gradient accumulation, activation checkpointing, torch.compile, CUDA graphs."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from crformer import train
from crformer.config import load_config
from crformer.data.dataset import Batch, Collate
from crformer.models import build_model
from crformer.models.losses import crformer_loss
from crformer.process import run
from crformer.train import accumulate_gradients
from tests.helpers import TINY_MODEL, train_losses


def float64_model(*overrides: str):
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL + ["data.image_size=64", *overrides])
    model = build_model(cfg).double().train()
    model.text_encoder.use_cache = False  # the frozen encoder's feature cache is fp32
    with torch.no_grad():  # zero-initialised gates would hide the gradients behind them
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(std=0.02)
    return cfg, model


def random_batch(model, batch: int, size: int = 64, length: int = 20, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    ids = torch.randint(1000, model.text_encoder.bert.config.vocab_size, (batch, length), generator=g) * mask
    images = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    target = (torch.rand(batch, size, size, generator=g) > 0.6).double()
    return Batch(images, ids, mask, target, index=torch.arange(batch), sentences=[""] * batch)


def gradients(model, cfg, batch: Batch, accum: int) -> tuple[dict, dict]:
    def forward_loss(images, input_ids, attention_mask, target, num_tokens):
        return crformer_loss(model(images, input_ids, attention_mask), target, cfg["loss"], num_tokens)

    model.zero_grad(set_to_none=True)
    terms = accumulate_gradients(forward_loss, batch, accum)
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accum_4_gives_the_update_of_the_whole_batch():
    # float64 and no randomness in the model (drop_path 0, frozen encoder in eval mode): the
    # micro-batches sum to the whole batch's loss up to rounding. The mask loss itself runs in fp32
    # (logits.float(), for bf16 training), so terms and gradients agree to fp32 rounding of sums
    # (seen: 1e-9 relative), not to float64's; a wrong divisor or a missing micro-batch is ≥ 1e-2.
    cfg, model = float64_model("loss.rec_sentence_weight=0.5")
    batch = random_batch(model, 8)
    whole_terms, whole = gradients(model, cfg, batch, accum=1)
    accum_terms, accumulated = gradients(model, cfg, batch, accum=4)
    assert whole.keys() == accumulated.keys() and len(whole) > 100
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-9, atol=1e-12, msg=name)
    for key in whole_terms:
        torch.testing.assert_close(accum_terms[key], whole_terms[key], rtol=1e-7, atol=1e-10)
    # The token-averaged reconstruction term is what needs the whole batch's divisor: the sentences
    # have different lengths, so a plain mean of micro-batch means would differ.
    assert whole_terms["rec"] != pytest.approx(
        sum(crformer_loss(model(x.images, x.input_ids, x.attention_mask), x.target, cfg["loss"])["rec"].item()
            for x in batch.split(4)) / 4, rel=1e-9)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg, model = float64_model()
    batch = random_batch(model, 4)
    _, plain = gradients(model, cfg, batch, accum=1)
    model.set_grad_checkpointing(True)
    assert model.decoder.grad_checkpointing and all(s.grad_checkpointing for s in model.backbone.swin.layers)
    _, recomputed = gradients(model, cfg, batch, accum=1)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the option is valid")
def test_cuda_graphs_on_cpu_is_one_line(tiny, capsys):
    with pytest.raises(SystemExit) as e:
        run(train.main, tiny + ["train.cuda_graphs=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: train.cuda_graphs=true needs a CUDA device; this run is on cpu"]


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("native", [True, False])
def test_train_amp_auto_is_bf16_only_where_the_cpu_has_bf16_kernels(monkeypatch, native):
    """An AVX2-only CPU runs bf16 matmuls ≈ 100× slower than fp32: ``auto`` trains in fp32 there, in bf16 on
    AVX-512/AMX CPUs, and inference (``eval.amp=auto``) stays fp32 on every CPU."""
    from crformer import engine

    monkeypatch.setattr(engine, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    cfg = load_config(None, TINY_MODEL + ["train.amp=auto"])
    model = build_model(cfg)
    seen = []
    model.register_forward_pre_hook(lambda *a: seen.append(torch.is_autocast_enabled("cpu")))
    batch = random_batch(model, 2, size=32)
    trainer = SimpleNamespace(device=cpu, cfg=cfg, ddp=model)
    train.Trainer.forward_loss(trainer, batch.images.float(), batch.input_ids, batch.attention_mask,
                               batch.target.float(), batch.attention_mask.sum())
    expected = [("auto", False, False), ("bf16", False, True), ("bf16", True, True), ("none", True, False)]
    for amp, training, _ in expected:
        with engine.autocast_context(cpu, amp, training=training):
            seen.append((amp, training, torch.is_autocast_enabled("cpu")))
    assert seen == [native, *expected]


def test_bf16_training_on_a_cpu_without_bf16_kernels_warns(monkeypatch):
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    for amp, warned in [("bf16", True), ("auto", False)]:
        trainer = SimpleNamespace(cfg=load_config(None, TINY_MODEL + [f"train.amp={amp}"]),
                                  device=torch.device("cpu"), rank=0, world=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.Trainer._check_and_seed(trainer)
        assert [str(w.message).split(":")[0] for w in caught] == (["train.amp=bf16 on a cpu without bf16 kernels (an "
                                                                   "AVX2-only CPU)"] if warned else [])


# ---------------------------------------------------------------- host syncs
class HostReads(TorchFunctionMode):
    """Every Python read of tensor values (on a GPU, a device→host wait unless the tensor is on the
    host), and every ``.to`` (a copy to the device, on a GPU), as (name, tensor)."""

    NAMES = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "to"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.reads.append((func.__name__, args[0]))
        return func(*args, **(kwargs or {}))


class SyncingOps(TorchDispatchMode):
    """aten ops whose output size or value the host must wait for."""

    NAMES = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.NAMES:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("finetune", [False, True], ids=["frozen-text", "finetuned-text"])
def test_a_step_reads_device_values_once_at_its_end(finetune, data_cache, tmp_path):
    """One training step reads one tensor's values in Python: the logged loss terms, at its end.
    The frozen text encoder's cache keys are read from the batch's host-side token ids."""
    cfg = load_config(None, TINY_MODEL + [f"data.cache_dir={data_cache}", f"train.out_dir={tmp_path}",
                                          f"model.text_finetune={str(finetune).lower()}", "train.grad_clip=1.0"])
    trainer = train.Trainer(cfg)
    if finetune and not trainer.model.text_encoder.prepared_mask:
        pytest.skip("this transformers' BERT checks its 2-D padding mask on the host in every forward")
    batch = Collate(trainer.tokenizer)([trainer.train_set[i] for i in range(trainer.local_batch)])
    trainer.train_step(batch)  # the first step fills the text cache
    host_ids = batch.input_ids.untyped_storage().data_ptr()
    with HostReads() as host, SyncingOps() as ops:
        terms = trainer.train_step(batch)
    on_ids = [name for name, t in host.reads if t.untyped_storage().data_ptr() == host_ids]
    device_reads = [name for name, t in host.reads if name != "to" and t.untyped_storage().data_ptr() != host_ids]
    assert device_reads == ["tolist"] and ops.calls == [], (device_reads, ops.calls)
    # On the CPU a copy to the device is the tensor itself: check that the ids are read, not moved.
    assert on_ids == (["to"] if finetune else ["tolist"]), on_ids
    assert "total" in terms and all(isinstance(v, float) for v in terms.values())


# ---------------------------------------------------------------- torch.compile (≈ 3 min per compile on 2 cores)
@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """Eager and compiled tiny runs, and each resumed by the other kind from step 3."""
    base = [o for o in TINY_MODEL] + [f"data.cache_dir={data_cache}", "train.epochs=1", "eval.language_check=false",
                                      "train.amp=none"]
    root = tmp_path_factory.mktemp("compile")
    out = {k: root / k for k in ("eager", "eager3", "compiled3")}
    run(train.main, base + [f"train.out_dir={out['eager']}", "train.max_steps=5"])
    run(train.main, base + [f"train.out_dir={out['eager3']}", "train.max_steps=3"])
    run(train.main, base + [f"train.out_dir={out['compiled3']}", "train.max_steps=3", "train.compile=default"])
    # Each checkpoint continues in the other mode.
    run(train.main, ["--resume", str(out["eager3"] / "last.pt"), "train.max_steps=5", "train.compile=default"])
    run(train.main, ["--resume", str(out["compiled3"] / "last.pt"), "train.max_steps=5", "train.compile=none"])
    return {k: train_losses(v) for k, v in out.items()} | {"dirs": out}


def test_compiled_steps_match_eager(runs):
    """Steps 1–3 of the compiled run from scratch; its steps after a resume are checked below (one compile less)."""
    eager, compiled = runs["eager"], runs["compiled3"]
    assert set(eager) == {1, 2, 3, 4, 5}
    for step in (1, 2, 3):
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3), (step, eager, compiled)


def test_compiled_and_eager_checkpoints_resume_each_other(runs):
    from crformer.checkpoint import load_checkpoint

    ckpt = load_checkpoint(runs["dirs"]["compiled3"] / "last.pt")
    assert not any("_orig_mod" in k for k in ckpt["model"])  # plain module keys
    for resumed in ("eager3", "compiled3"):  # eager3 went on compiled, compiled3 went on eager
        assert set(runs[resumed]) == {1, 2, 3, 4, 5}
        for step in (4, 5):
            assert runs[resumed][step] == pytest.approx(runs["eager"][step], rel=1e-3), (resumed, step)


def test_lr_schedule_warms_up_holds_the_peak_then_decays():
    from crformer.train import poly_with_warmup

    total, warmup = 700, 100
    paper, held = poly_with_warmup(total, warmup, 0.9), poly_with_warmup(total, warmup, 0.9, hold=4 / 7)
    for step in range(total):  # hold=0 is the paper's schedule, unchanged
        assert paper(step) == (step + 1) / warmup if step < warmup else max(0.0, 1 - (step - warmup) / 600) ** 0.9
    assert [held(s) for s in (0, 99)] == [paper(0), paper(99)]
    assert all(held(s) == 1.0 for s in range(warmup, 400)) and held(399) == 1.0 > held(401) > held(600) > 0
    assert held(400) == 1.0 and abs(held(550) - 0.5 ** 0.9) < 1e-12 and held(total) == 0.0
