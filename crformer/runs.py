"""Training runs in worker processes, one result file each: what the seed sweep (:mod:`crformer.sweep`)
and the studies beside the library (``crformer_studies``) are made of.

:class:`Run` describes one run (a seed and ``key=value`` overrides of the default config);
:func:`train_runs` trains a list of them, ``jobs`` at a time, each in a spawned worker, writing
``<runs_dir>/<name>.json`` (:func:`train_and_measure`: val metrics by kind, the language check, the
per-epoch history, timing) as soon as it finishes; :func:`unfinished` skips runs whose file exists
with the same overrides, so an interrupted sweep or study resumes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from crformer.config import load_config
from crformer.engine import evaluate_split

#: The splits whose metrics every run file keeps.
METRIC_SPLITS = ("val_easy", "val_hard")


@dataclass
class Run:
    """One training run (of the seed sweep, :mod:`crformer.sweep`, or of a study).

    ``name``: its checkpoint folder under the work dir and its run file's stem; ``title``: how the
    progress lines call it; ``overrides``: ``key=value`` on top of the default config (the seed
    aside), recorded in the run file, which is retrained when they change; ``labels``: extra fields
    of the run file (the study's variant, the sweep's thread count); ``probe``: a module-level
    function ``(model, refer, cfg, tokenizer, device)`` → dict run on the final model, its result
    stored as the run file's ``probe`` (the study's :func:`crformer_studies.probe.probe_layers`).
    """

    name: str
    title: str
    seed: int
    overrides: list
    labels: dict = field(default_factory=dict)
    probe: Optional[Callable] = None


def train_and_measure(run: Run, work_dir: Path) -> dict:
    """Train ``run`` (checkpoints and log.jsonl in ``work_dir/run.name``); its run file's content: the
    final model's val metrics (easy/hard, overall and by kind, and the language check when
    ``eval.language_check`` is on), the trainer's per-epoch history, the probe if asked, timing."""
    from crformer.train import Trainer

    cfg = load_config(None, run.overrides + [f"train.seed={run.seed}", f"train.out_dir={work_dir / run.name}"])
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.fit()
    model, device = trainer.model, trainer.device
    metrics = {}
    for split in METRIC_SPLITS:
        r = evaluate_split(model, trainer.refer, split, cfg, trainer.tokenizer, device,
                           language_check=cfg["eval"]["language_check"])
        metrics[split] = {key: r[key] for key in ("overall", "by_kind", "language_check") if key in r}
    result = {**run.labels, "seed": run.seed, "overrides": run.overrides, "metrics": metrics}
    if run.probe is not None:
        result["probe"] = run.probe(model, trainer.refer, cfg, trainer.tokenizer, device)
    return {**result, "seconds": round(time.perf_counter() - start, 1), "steps": trainer.step,
            "history": trainer.history}


#: Set in a worker process by the first Ctrl-C or stop: the runs already queued to it must not start.
_stopped = False


def _ignore_interrupts() -> None:
    """Worker initializer: an idle worker is ended by its pool, so Ctrl-C must not kill it with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_and_save(run: Run, work_dir: str, path: str) -> dict:
    """:func:`train_and_measure`, its result written atomically to ``path`` (a worker-process entry point).
    Ctrl-C (SIGINT) ends this run and every later one in the same worker."""
    from crformer.cli import quiet_libraries

    global _stopped
    if _stopped:
        raise KeyboardInterrupt
    quiet_libraries()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = train_and_measure(run, Path(work_dir))
    except KeyboardInterrupt:
        _stopped = True
        raise
    finally:
        _ignore_interrupts()  # Ctrl-C reaches a worker twice (from the terminal and from train_runs)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def unfinished(runs: list, runs_dir: Path, force: bool = False) -> list:
    """The runs of ``runs`` to train: those without a run file ``runs_dir/<name>.json``, those whose
    file was made with other overrides, and with ``force`` all; says which are skipped and why."""
    todo = []
    for run in runs:
        path = runs_dir / f"{run.name}.json"
        if path.is_file() and not force:
            if json.loads(path.read_text()).get("overrides") == run.overrides:
                print(f"{run.title}: done already ({path})", flush=True)
                continue
            print(f"{run.title}: {path} was made with another setting; retraining", flush=True)
        todo.append(run)
    return todo


@contextlib.contextmanager
def _workers_environment(**values: str):
    """Set environment variables while worker processes start, which inherit them, and restore this
    process's afterwards. ``TQDM_DISABLE``: parallel runs' progress bars would interleave (the parent
    reports); tqdm reads it when it is imported, which a worker does before it takes a task."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def train_runs(runs: list, runs_dir: Path, work_dir: str, jobs: int) -> None:
    """Train ``runs``, ``jobs`` at a time, each in a spawned worker process (no state inherited from
    this one; a worker may train several runs in turn, each seeding itself and setting its thread
    count), each result written to ``runs_dir/<name>.json`` as soon as it finishes, so an interrupted
    study or sweep resumes with :func:`unfinished`."""
    if not runs:
        return
    ctx = multiprocessing.get_context("spawn")
    with _workers_environment(TQDM_DISABLE="1"), \
            concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                                   initializer=_ignore_interrupts) as pool:
        futures = {pool.submit(run_and_save, run, work_dir, str(runs_dir / f"{run.name}.json")): run for run in runs}
        try:
            for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                result = fut.result()
                m = result["metrics"]
                print(f"[{n}/{len(runs)}] {futures[fut].title}: val mIoU easy "
                      f"{100 * m['val_easy']['overall']['mIoU']:.2f}  hard {100 * m['val_hard']['overall']['mIoU']:.2f}"
                      f"  ({result['seconds']:.0f} s)", flush=True)
        except BaseException:
            # A stop signal from a scheduler or `kill` reaches this process only, and leaving the `with` would
            # wait for the workers' runs and then start the queued ones. So: cancel the queue and interrupt
            # the runs as Ctrl-C in a terminal does (they unwind, nothing half-written is left).
            pool.shutdown(wait=False, cancel_futures=True)
            workers = multiprocessing.active_children()
            for worker in workers:
                os.kill(worker.pid, signal.SIGINT)
            for worker in workers:
                worker.join(timeout=60)
                if worker.is_alive():
                    worker.terminate()
            raise


def int_list(text: str) -> list:
    """``--seeds 0,1,2`` → [0, 1, 2]."""
    return [int(t) for t in text.split(",")]
