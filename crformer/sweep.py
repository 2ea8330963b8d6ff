"""Seed sweep of the default run: does it learn the hard split on every seed and thread count?

``python -m crformer.sweep [--seeds 0,1,2,3] [--threads 1,2] [--jobs N] [--out DIR] [key=value ...]``
trains the default config (README command 1; ``key=value`` overrides on top) once per seed × thread
count, evaluates each final model on the validation splits (by sentence kind, with the language
check) and prints one markdown table: easy and hard mIoU, the hard split's kinds, the IoU with the
old target after the sentence swap (val_hard), the first epoch whose val hard mIoU reached
:data:`LEARNED`, seconds, and whether the run met :data:`TARGETS`; then a summary line.

The runs go through :mod:`crformer.runs` (as the ablation study's do: spawned workers, one
JSON per run written as soon as it finishes, with the per-epoch val history by kind): each run file is
``--out/s<seed>-t<threads>.json`` (default ``benchmarks/results/sweep``), the table goes to
``--out/table.md``, checkpoints and logs to ``--work-dir/s<seed>-t<threads>``. Finished runs are
skipped, so an interrupted sweep resumes and a finished one only prints its table again; a run file
made with other overrides is retrained. ``--jobs`` is the number of threads in use at once: runs with
T threads train ``max(1, jobs // T)`` at a time (default 2: 1-thread runs side by side, 2-thread runs
alone), so the seconds of side-by-side runs include their contention.
"""

from __future__ import annotations

import argparse
import json
import statistics

from crformer.runs import Run, int_list, train_runs, unfinished
from crformer.cli import parser, quiet_libraries
from crformer.config import load_config
from crformer.errors import UserError
from crformer.files import check_writable
from crformer.process import run

#: Issue 21's targets for the default run: val easy and hard mIoU at least, the language check's IoU
#: with the old target (both val splits) at most.
TARGETS = {"easy": 0.93, "hard": 0.82, "old target": 0.05}
#: Issue 21's target for the sweep as a whole: the median run's val hard mIoU at least.
MEDIAN_HARD = 0.86
#: The val hard mIoU whose first epoch the table reports: above the plateau (≈ 0.50–0.57 in the
#: recorded default runs, where the relational and superlative sentences are not yet learned).
LEARNED = 0.70
HARD_KINDS = ("relational", "superlative", "two-attr")
#: Set per run by the sweep itself, so not accepted as ``key=value``.
SWEEP_KEYS = ("train.seed", "train.num_threads", "train.out_dir")
COLUMNS = ["seed", "threads", "easy", "hard", *HARD_KINDS, "old target (hard)", f"hard ≥ {LEARNED:.0%} at epoch",
           "seconds", "targets"]


def sweep_run(seed: int, threads: int, overrides: list) -> Run:
    """The sweep's run of ``seed`` at ``threads`` threads: the default config, the user's overrides."""
    return Run(f"s{seed}-t{threads}", f"seed {seed}, {threads} thread{'s' if threads > 1 else ''}", seed,
               list(overrides) + [f"train.num_threads={threads}"], labels={"threads": threads})


def first_epoch_over(history: list, threshold: float, split: str = "val_hard") -> int | None:
    """The first epoch of a run's history whose ``split`` mIoU reached ``threshold`` (None: never)."""
    return next((h["epoch"] for h in history if h["val"][split]["mIoU"] >= threshold), None)


def old_target(result: dict, split: str) -> float | None:
    """The language check's IoU with the old target on ``split`` (None: the run did not check)."""
    check = result["metrics"][split].get("language_check")
    return None if check is None else check["old_target_mIoU"]


def missed_targets(result: dict) -> list:
    """The names of the :data:`TARGETS` that a run missed (empty: it met them all); the old target
    counts on both val splits, and a run without the language check misses it."""
    m = result["metrics"]
    olds = [old_target(result, split) for split in ("val_easy", "val_hard")]
    met = {"easy": m["val_easy"]["overall"]["mIoU"] >= TARGETS["easy"],
           "hard": m["val_hard"]["overall"]["mIoU"] >= TARGETS["hard"],
           "old target": None not in olds and max(olds) <= TARGETS["old target"]}
    return [name for name, ok in met.items() if not ok]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def table_row(result: dict) -> list:
    """One run's cells, in :data:`COLUMNS` order."""
    m = result["metrics"]
    kinds = m["val_hard"]["by_kind"]
    missed = missed_targets(result)
    return [str(result["seed"]), str(result["threads"]), _pct(m["val_easy"]["overall"]["mIoU"]),
            _pct(m["val_hard"]["overall"]["mIoU"]),
            *(_pct(kinds[k]["mIoU"] if k in kinds else None) for k in HARD_KINDS),
            _pct(old_target(result, "val_hard")), str(first_epoch_over(result["history"], LEARNED) or "never"),
            f"{result['seconds']:.0f}", "met" if not missed else "missed: " + ", ".join(missed)]


def summary_line(results: list) -> str:
    """Minimum and median hard mIoU (against :data:`MEDIAN_HARD`), and how many runs met every target."""
    hard = [r["metrics"]["val_hard"]["overall"]["mIoU"] for r in results]
    median = statistics.median(hard)
    passed = sum(not missed_targets(r) for r in results)
    verdict = "all pass" if passed == len(results) and median >= MEDIAN_HARD else "NOT all pass"
    return (f"{len(results)} runs: hard mIoU min {100 * min(hard):.1f}, median {100 * median:.1f} "
            f"(target ≥ {100 * MEDIAN_HARD:.0f}); "
            f"every target met (easy ≥ {100 * TARGETS['easy']:.0f}, hard ≥ {100 * TARGETS['hard']:.0f}, "
            f"old-target IoU ≤ {100 * TARGETS['old target']:.0f} on both val splits) by {passed} of "
            f"{len(results)}: {verdict}")


def table_markdown(results: list) -> str:
    """The sweep's table (mIoU and IoU in %, rows by seed, then threads) and its summary line."""
    rows = [table_row(r) for r in sorted(results, key=lambda r: (r["seed"], r["threads"]))]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + ["", summary_line(results)]) + "\n"


def _thread_counts(text: str) -> list:
    """``--threads 1,2`` → [1, 2]; every count at least 1."""
    try:
        values = int_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts start at 1")
    return values


def _check_overrides(overrides: list, seeds: list, threads: list) -> None:
    """One-line errors, before any worker starts: a key the sweep sets itself, or a config that
    :func:`load_config` rejects (a bad key or value, a negative seed)."""
    for override in overrides:
        if override.split("=", 1)[0] in SWEEP_KEYS:
            raise UserError(f"{override}: the sweep sets {', '.join(SWEEP_KEYS)} itself (use --seeds, --threads, "
                            "--work-dir)")
    for seed in seeds:
        load_config(None, list(overrides) + [f"train.seed={seed}", f"train.num_threads={threads[0]}"])


def main(argv=None) -> None:
    p = parser("python -m crformer.sweep", __doc__)
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3], help="comma-separated (default 0,1,2,3)")
    p.add_argument("--threads", type=_thread_counts, default=[1, 2], help="comma-separated (default 1,2)")
    p.add_argument("--jobs", type=int, default=2,
                   help="threads in use at once (default 2): runs with T threads train max(1, jobs // T) at a time")
    p.add_argument("--out", default="benchmarks/results/sweep", help="run files and table.md")
    p.add_argument("--work-dir", default="runs/sweep", help="checkpoints and logs of the runs")
    p.add_argument("--force", action="store_true", help="retrain runs that already have a run file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on top of the default")
    a = p.parse_args(argv)
    if a.jobs < 1:
        raise UserError(f"--jobs {a.jobs}: at least 1")
    _check_overrides(a.overrides, a.seeds, a.threads)
    quiet_libraries()
    out = check_writable(a.out, "--out", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(dict.fromkeys(a.seeds))  # a seed named twice is one run, not two writing one file
    runs = {threads: [sweep_run(seed, threads, a.overrides) for seed in seeds] for threads in a.threads}
    for threads, group in runs.items():
        train_runs(unfinished(group, out, a.force), out, a.work_dir, max(1, a.jobs // threads))
    table = table_markdown([json.loads((out / f"{r.name}.json").read_text())
                            for group in runs.values() for r in group])
    (out / "table.md").write_text(table)
    print(table + f"\nwrote {out / 'table.md'} and the run files in {out}")


if __name__ == "__main__":
    run(main)
