"""Train CRFormer: ``python -m crformer.train [--config C] [--resume CKPT] [key=value ...]``.

Single process on CPU or one GPU, or many through ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU).
Writes to ``train.out_dir``: ``log.jsonl`` (loss terms, lr, images/s), ``last.pt`` (every epoch and
every ``train.checkpoint_every`` steps), ``best.pt`` (best mean oIoU over ``data.val_splits``; test splits are
read only by the final report), ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from crformer.checkpoint import (code_version, load_checkpoint, load_model_state, model_state, remove_stale_temp_files,
                                 rng_state, save_checkpoint, set_rng_state)
from crformer.cli import config_args, parser, quiet_libraries
from crformer.config import load_config, merge_config
from crformer.data import open_refer
from crformer.data.dataset import Batch, Collate, RefDataset
from crformer.data.tokenizer import SentenceTokenizer
from crformer.distributed import barrier, cleanup, init_distributed, is_main
from crformer.engine import (autocast_context, compile_mode, evaluate_split, language_check_lines, native_bf16,
                             report_rows)
from crformer.errors import UserError
from crformer.files import append_line, check_writable, link_atomic, write_bytes_atomic
from crformer.metrics import format_table
from crformer.models import CRFormer
from crformer.models.losses import crformer_loss
from crformer.process import run

#: Parameters named like this are position tables: no weight decay (with norms, biases and every
#: embedding table, see :func:`param_groups`).
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "query_pos", "slots")


def param_groups(model: torch.nn.Module, cfg: dict) -> list:
    """AdamW groups: (pretrained Swin | text encoder | the rest) × (decay | no decay).

    Learning rates: ``train.backbone_lr`` (null: ``train.lr``) for the pretrained Swin weights only,
    ``train.text_lr`` for the text encoder, ``train.lr`` for everything new — the VLF modules inside
    the backbone included, since they start from random weights like the decoder. Weight decay:
    none on norms, biases, position tables and embedding tables (BERT's word, position and
    token-type embeddings: LAVT decays them, but decay pulls rarely seen words' rows to zero, the
    reason BERT-style recipes exempt embeddings); ``train.weight_decay`` on the rest."""
    t = cfg["train"]
    lrs = {"backbone": t["backbone_lr"] or t["lr"], "text": t["text_lr"], "head": t["lr"]}
    no_decay_modules = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm)
    exempt = {id(p) for m in model.modules() if isinstance(m, no_decay_modules) for p in m.parameters(recurse=False)}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.swin.") else "text" if name.startswith("text_encoder.") else "head"
        decay = not (id(p) in exempt or p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES))
        key = (part, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lrs[part], "weight_decay": t["weight_decay"] if decay else 0.0,
                           "name": f"{part}{'' if decay else '/no_decay'}"}
        groups[key]["params"].append(p)
    return list(groups.values())


def poly_with_warmup(total: int, warmup: int, power: float, hold: float = 0.0):
    """LR factor: linear warm-up over ``warmup`` steps, the peak held until ``hold`` × ``total`` steps
    (0: not held, the paper's schedule), then (1 − progress)^power over the steps left."""
    start = max(warmup, round(hold * total))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < start:
            return 1.0
        return max(0.0, 1 - (step - start) / max(1, total - start)) ** power
    return f


def accumulate_gradients(forward_loss, batch: Batch, accum: int, no_sync=contextlib.nullcontext) -> dict:
    """Backward of one :class:`Batch` in ``accum`` equal micro-batches: the gradients (and the
    returned, detached loss terms) equal those of the whole batch at once.

    ``forward_loss(images=, input_ids=, attention_mask=, target=, num_tokens=)`` → loss terms of a
    micro-batch (the batch's tensors, by name). Every term is a mean over
    samples or pixels except the reconstruction loss, a mean over valid tokens: each micro-batch
    divides by the whole batch's token count ÷ ``accum``. ``no_sync``: DDP's, so the gradients are
    all-reduced once, after the last micro-batch."""
    num_tokens = batch.attention_mask.sum() / accum
    total: dict = {}
    for i, part in enumerate(batch.split(accum)):
        with no_sync() if i < accum - 1 else contextlib.nullcontext():
            terms = forward_loss(images=part.images, input_ids=part.input_ids, attention_mask=part.attention_mask,
                                 target=part.target, num_tokens=num_tokens)
            (terms["total"] / accum).backward()
        for k, v in terms.items():
            total[k] = total.get(k, 0) + v.detach() / accum
    return total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Resume:
    """A checkpoint to continue from: its ``path`` (for messages) and its contents, as
    :func:`crformer.checkpoint.load_checkpoint` ``(path, resume=True)`` returned them (read once)."""

    path: str
    checkpoint: dict


class Trainer:
    """One training run: ``Trainer(cfg, resume=None)`` builds it (:meth:`fit` trains, :meth:`final_report`
    evaluates); each builder below is one job, in the order the run needs them — checks that need
    nothing, the model (a bad text encoder or weights file is reported before any data work), the
    data, the step, the optimizer, then the state a resumed run continues from."""

    def __init__(self, cfg: dict, resume: Resume | None = None):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self._check_and_seed()
        self.out = check_writable(cfg["train"]["out_dir"], "train.out_dir", folder=True)
        self.tokenizer = SentenceTokenizer(cfg["model"]["text_encoder"], cfg["data"]["max_tokens"])
        self.model = CRFormer.from_config(cfg, self.device).to(self.device)
        self._build_data()
        self._build_step()
        self._build_optimizer()
        self.step, self.best, self.history = 0, -1.0, []
        if resume is not None:
            self._resume(resume)
        if is_main():
            self._prepare_out_dir()

    def _check_and_seed(self) -> None:
        t = self.cfg["train"]
        if t["cuda_graphs"] and self.device.type != "cuda":
            raise UserError(f"train.cuda_graphs=true needs a CUDA device; this run is on {self.device.type}")
        if t["batch_size"] % (self.world * t["grad_accum"]):
            raise UserError(f"train.batch_size={t['batch_size']} is not divisible by {self.world} process(es) × "
                            f"train.grad_accum={t['grad_accum']} micro-batches")
        if t["amp"] == "bf16" and not native_bf16(self.device):
            warnings.warn(f"train.amp=bf16 on a {self.device.type} without bf16 kernels (an AVX2-only CPU): its bf16 "
                          "matmuls run ≈ 100× slower than fp32; train.amp=auto trains in fp32 here")
        if t["num_threads"]:
            torch.set_num_threads(t["num_threads"])
        seed_everything(t["seed"] + self.rank)

    def _build_data(self) -> None:
        """The REFER data (rank 0 prepares synthetic data first, the others then read it), its checks,
        the training set and the step counts."""
        cfg, t, d = self.cfg, self.cfg["train"], self.cfg["data"]
        if is_main():
            self.refer = open_refer(cfg)
        barrier()
        if not is_main():
            self.refer = open_refer(cfg)
        self.refer.check_splits([d["train_split"], *d["val_splits"], *d["test_splits"]])
        if is_main():
            self.refer.check_images([d["train_split"], *d["val_splits"], *d["test_splits"]], progress=True)
        self.train_set = RefDataset(self.refer, d["train_split"], d["image_size"], train=True, seed=t["seed"],
                                    preload=d["preload"])
        if len(self.train_set) == 0:
            raise UserError(f"split {d['train_split']!r} has no samples")
        self.local_batch = t["batch_size"] // self.world
        self.steps_per_epoch = self.train_set.epoch_size(d["one_attr_fraction"]) // self.world // self.local_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={t['batch_size']} is larger than the training set "
                            f"({len(self.train_set)} objects)")
        self.total_steps = t["epochs"] * self.steps_per_epoch

    def _build_step(self) -> None:
        """DDP around the model (several processes) and the forward + loss, compiled if asked."""
        t = self.cfg["train"]
        # No device_ids: DDP would copy every input to the GPU, the token ids included (see train_step).
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else self.model
        mode = compile_mode(t["compile"], t["cuda_graphs"])
        # Static shapes: sentences are padded to max_tokens and every batch is full (drop_last), so
        # one graph serves the whole run. Checkpoints keep self.model's plain keys either way.
        self.step_loss = self.forward_loss if mode is None else torch.compile(self.forward_loss, mode=mode,
                                                                               dynamic=False)

    def _build_optimizer(self) -> None:
        t = self.cfg["train"]
        # The fused kernel (CPU and CUDA) updates all parameters in one pass: 4× faster than the
        # per-tensor loop on CPU (41 → 10 ms per step for the default model, 2 cores).
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.cfg), lr=t["lr"],
                                           weight_decay=t["weight_decay"], fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_with_warmup(self.total_steps, t["warmup_iters"], t["poly_power"], t["lr_hold"]))

    def _resume(self, resume: Resume) -> None:
        """Model, optimizer, schedule, counters and RNG from the checkpoint; a finished run, or one that
        already reached train.max_steps, is refused with what to do instead."""
        ckpt, path, t = resume.checkpoint, resume.path, self.cfg["train"]
        load_model_state(self.model, ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # parameter groups of another model version
            raise UserError(f"the optimizer state in {path} does not fit this model's parameters ({e}); "
                            "it was written before parameters were removed; evaluate and predict still load it, "
                            "but its training cannot be resumed") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.best, self.history = ckpt["step"], ckpt["best"], ckpt.get("history", [])
        set_rng_state(ckpt["rng"][min(self.rank, len(ckpt["rng"]) - 1)])
        if self.step >= self.total_steps:
            raise UserError(f"{path} is a finished run (step {self.step} of {self.total_steps}); nothing to "
                            f"resume (evaluate it with python -m crformer.evaluate --checkpoint {path})")
        if t["max_steps"] and self.step >= t["max_steps"]:
            raise UserError(f"{path} stopped at train.max_steps={t['max_steps']}; to continue, pass "
                            f"train.max_steps=N with N > {self.step}, or 0 for the whole run")

    def _prepare_out_dir(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(self.out):
            print(f"removed {stale.name}, left by an interrupted checkpoint write", flush=True)
        write_bytes_atomic(self.out / "config.json", json.dumps(self.cfg, indent=1).encode(), "run config")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, name: str, metrics: dict | None = None) -> None:
        states = [rng_state()]
        if self.world > 1:  # every rank's RNG, so each resumes its own dropout stream
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if not is_main():
            return
        save_checkpoint({
            "model": model_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "step": self.step, "best": self.best, "rng": states,
            "history": self.history, "config": self.cfg, "metrics": metrics, "version": code_version(),
            "text_encoder": self.cfg["model"]["text_encoder"],
        }, self.out / name)

    def log(self, record: dict) -> None:
        if is_main():
            append_line(self.out / "log.jsonl", json.dumps(record), "training log")

    # ------------------------------------------------------------------ loop
    def evaluate(self, splits: list, language_check: bool = False, progress: bool = False) -> dict:
        return {split: evaluate_split(self.model, self.refer, split, self.cfg, self.tokenizer, self.device,
                                      protocol=self.cfg["eval"]["protocol"], language_check=language_check,
                                      rank=self.rank, world=self.world, progress=progress)
                for split in splits}

    def forward_loss(self, images, input_ids, attention_mask, target, num_tokens) -> dict:
        """Loss terms of one (micro-)batch; what ``train.compile`` compiles."""
        with autocast_context(self.device, self.cfg["train"]["amp"], training=True):
            out = self.ddp(images, input_ids, attention_mask)
            return crformer_loss(out, target, self.cfg["loss"], num_tokens)

    def train_step(self, batch: Batch) -> dict:
        t = self.cfg["train"]
        self.optimizer.zero_grad(set_to_none=True)
        no_sync = self.ddp.no_sync if self.world > 1 else contextlib.nullcontext
        terms = accumulate_gradients(self.step_loss, batch.to(self.device, non_blocking=True), t["grad_accum"], no_sync)
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        # The step's one host sync: the logged loss terms.
        return dict(zip(terms, torch.stack(list(terms.values())).tolist()))

    def fit(self) -> None:
        t = self.cfg["train"]
        max_steps = t["max_steps"] or self.total_steps
        collate = Collate(self.tokenizer)
        start_epoch = self.step // self.steps_per_epoch
        for epoch in range(start_epoch, t["epochs"]):
            if self.step >= max_steps:
                break
            self.train_set.set_epoch(epoch)
            order = self.train_set.epoch_order(epoch, self.cfg["data"]["one_attr_fraction"], self.rank,
                                               self.world)[: self.steps_per_epoch * self.local_batch]
            skip = self.step - epoch * self.steps_per_epoch  # batches already done (mid-epoch resume)
            loader = DataLoader(self.train_set, batch_size=self.local_batch, sampler=order[skip * self.local_batch:],
                                collate_fn=collate, num_workers=self.cfg["data"]["num_workers"],
                                pin_memory=self.device.type == "cuda")
            bar = loader
            if is_main():
                from tqdm import tqdm

                bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t['epochs']}", initial=skip, total=self.steps_per_epoch,
                           dynamic_ncols=True, leave=False)
            tick = time.perf_counter()
            for batch in bar:
                terms = self.train_step(batch)
                if not all(math.isfinite(v) for v in terms.values()):
                    raise RuntimeError(f"non-finite loss at step {self.step}: {terms}")
                now = time.perf_counter()
                ips = len(batch) * self.world / (now - tick)
                tick = now
                if self.step % t["log_every"] == 0 or self.step == max_steps:
                    self.log({"step": self.step, "epoch": epoch, **terms,
                              "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": round(ips, 2)})
                if is_main():
                    bar.set_postfix(loss=f"{terms['total']:.3f}", ips=f"{ips:.0f}")
                if t["checkpoint_every"] and self.step % t["checkpoint_every"] == 0:
                    self.checkpoint("last.pt")
                if self.step >= max_steps:
                    break
            epoch_done = self.step == (epoch + 1) * self.steps_per_epoch
            if not epoch_done:  # stopped by max_steps mid-epoch: keep a resumable checkpoint
                self.checkpoint("last.pt")
                break
            self.end_epoch(epoch + 1)

    def end_epoch(self, epoch: int) -> None:
        """After epoch ``epoch`` (1-based): validate, record, keep last.pt and, when it improved, best.pt."""
        results = self.evaluate(self.cfg["data"]["val_splits"])  # selection: val splits only, never test
        score = float(np.mean([r["overall"]["oIoU"] for r in results.values()]))
        summary = {split: {k: round(v, 4) for k, v in r["overall"].items()} for split, r in results.items()}
        # mIoU per sentence kind: the per-kind learning curves (which kinds a run has learned when)
        by_kind = {split: {kind: round(m["mIoU"], 4) for kind, m in r["by_kind"].items()}
                   for split, r in results.items()}
        self.history.append({"epoch": epoch, "step": self.step, "val": summary, "val_by_kind": by_kind})
        self.log({"step": self.step, "epoch": epoch, "val": summary, "val_by_kind": by_kind})
        if is_main():
            print(f"epoch {epoch}/{self.cfg['train']['epochs']}  " + "  ".join(
                f"{s}: oIoU {100 * r['overall']['oIoU']:.2f} mIoU {100 * r['overall']['mIoU']:.2f}"
                for s, r in results.items()), flush=True)
        if score > self.best:  # best.pt first: a kill before last.pt is written re-runs the epoch
            self.best = score
            self.checkpoint("best.pt", summary)
            if is_main():  # the same state: one write, two names
                link_atomic(self.out / "best.pt", self.out / "last.pt", "checkpoint")
        else:
            self.checkpoint("last.pt", summary)

    def final_report(self) -> dict:
        """Evaluate the best checkpoint on the val splits (per-kind breakdown, language check), then,
        once, on the test splits (the only time training reads them); print one table under
        "validation" and one under "test", write metrics.json (split → results)."""
        best = self.out / "best.pt"
        barrier()
        if best.is_file():
            load_model_state(self.model, load_checkpoint(best)["model"])
        d, e = self.cfg["data"], self.cfg["eval"]
        sections = {"validation": self.evaluate(d["val_splits"], e["language_check"], progress=is_main()),
                    "test": self.evaluate(d["test_splits"], e["language_check"], progress=is_main())}
        if is_main():
            metrics = json.dumps({**sections["validation"], **sections["test"]}, indent=1)
            write_bytes_atomic(self.out / "metrics.json", metrics.encode(), "metrics file")
            for heading, results in sections.items():
                if not results:
                    continue
                print(f"\n{heading} ({'best' if best.is_file() else 'last'} checkpoint, protocol "
                      f"{e['protocol']}; values in %)")
                print(format_table(report_rows(results)))
                for line in language_check_lines(results):
                    print(line)
        return {**sections["validation"], **sections["test"]}


def main(argv=None) -> None:
    p = parser("python -m crformer.train", __doc__)
    config_args(p)
    p.add_argument("--resume", default=None, help="checkpoint to continue from (its config is used)")
    a = p.parse_args(argv)
    quiet_libraries()
    resume = None
    if a.resume:
        if a.config:
            raise UserError("--resume continues with the checkpoint's config; pass overrides, not --config")
        resume = Resume(a.resume, load_checkpoint(a.resume, resume=True))
        # A resumed run writes beside the checkpoint the user named, not where its config says.
        cfg = merge_config(resume.checkpoint["config"], a.overrides, out_dir=str(Path(a.resume).expanduser().parent))
    else:
        cfg = load_config(a.config, a.overrides)
    trainer = Trainer(cfg, resume=resume)
    try:
        if is_main():
            print(f"training on {trainer.device} ({trainer.world} process{'es' if trainer.world > 1 else ''}): "
                  f"{len(trainer.train_set)} objects, {trainer.steps_per_epoch} steps/epoch, "
                  f"{cfg['train']['epochs']} epochs, out_dir {trainer.out}", flush=True)
        trainer.fit()
        if trainer.step >= trainer.total_steps:
            trainer.final_report()
    finally:
        cleanup()


if __name__ == "__main__":
    run(main)
