"""Language-fidelity study: the paper's ablations on the synthetic benchmark, with a per-layer probe.

``python -m crformer_studies.ablation`` trains every variant of
:data:`crformer_studies.variants.VARIANTS` for every seed (a small, fast setting:
:data:`STUDY`), evaluates each on the easy and hard validation splits, probes how much of the
sentence the queries of each decoder layer still carry, and writes into ``--out``
(default ``docs/ablations``): one JSON per run under ``runs/``, ``results.json`` (the aggregate),
``tables.md`` and the plots ``metrics.png``, ``curves.png`` (val mIoU after every epoch) and
``probe.png``. Finished runs are skipped, so an interrupted study continues where it stopped;
``--report-only`` rebuilds tables and plots from the run files alone.
The runs go through :mod:`crformer.runs` (as the seed sweep's do); the probe is
:mod:`crformer_studies.probe`, the tables and plots :mod:`crformer_studies.report`.

The probe (:func:`crformer_studies.probe.probe_layers`) reads how much of the sentence (its colour,
shape and spatial words, and its sentence feature) a linear read-out still finds in the queries of
each decoder layer, before and after the calibration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from crformer.errors import UserError
from crformer.runs import Run, int_list, train_runs, unfinished
from crformer_studies.probe import probe_layers
from crformer_studies.report import contrasts_markdown, report, tables_markdown
from crformer_studies.variants import STUDY, VARIANTS


def study_run(variant: str, seed: int, overrides: list) -> Run:
    """The study's run of ``variant`` with ``seed``: :data:`STUDY`, the variant's overrides, then the user's."""
    return Run(f"{variant}-s{seed}", f"{variant} seed {seed}", seed, STUDY + VARIANTS[variant] + list(overrides),
               labels={"variant": variant}, probe=probe_layers)


def reprobe(out: Path, work_dir: Path) -> None:
    """Recompute the probe of every finished run from its final checkpoint (``work_dir/<run>/last.pt``,
    the model the run probed), e.g. after the probe changed; the metrics are kept."""
    from crformer.api import Segmenter
    from crformer.data import open_refer

    for path in sorted((out / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        ckpt = work_dir / f"{run['variant']}-s{run['seed']}" / "last.pt"
        if not ckpt.is_file():
            raise UserError(f"no checkpoint {ckpt} for {path.name}: retrain it with --force")
        seg = Segmenter.from_checkpoint(ckpt, "cpu")
        if seg.cfg["train"]["num_threads"]:
            torch.set_num_threads(seg.cfg["train"]["num_threads"])
        run["probe"] = probe_layers(seg.model, open_refer(seg.cfg), seg.cfg, seg.tokenizer, seg.device)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(path)
        print(f"re-probed {path.name}", flush=True)


def _variant_list(text: str) -> list:
    names = text.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return names


def main(argv=None) -> None:
    from crformer.cli import quiet_libraries

    p = argparse.ArgumentParser(prog="python -m crformer_studies.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/ablations", help="results folder (run files, tables, plots)")
    p.add_argument("--work-dir", default="runs/ablation", help="checkpoints and logs of the runs")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    p.add_argument("--variants", type=_variant_list, default=list(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time (default 2)")
    p.add_argument("--force", action="store_true", help="retrain runs that already have a result file")
    p.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from run files")
    p.add_argument("--reprobe", action="store_true",
                   help="recompute the probes of finished runs from their checkpoints in --work-dir, then report")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on top of the study's")
    a = p.parse_args(argv)
    quiet_libraries()
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if a.reprobe:
        reprobe(out, Path(a.work_dir))
    elif not a.report_only:
        runs = [study_run(variant, seed, a.overrides) for variant in a.variants for seed in a.seeds]
        train_runs(unfinished(runs, out / "runs", a.force), out / "runs", a.work_dir, a.jobs)
    agg = report(out)
    print(tables_markdown(agg) + "\n" + contrasts_markdown(agg))
    print(f"wrote {out / 'results.json'}, {out / 'tables.md'} and the plots in {out}")


if __name__ == "__main__":
    from crformer.process import run

    run(main)
