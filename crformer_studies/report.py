"""The study's report: run files → aggregate (mean ± std over seeds), markdown tables, contrasts
between variants, and plots (:func:`report`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crformer.errors import UserError
from crformer.runs import METRIC_SPLITS
from crformer_studies.probe import PROBE_STATE_LABELS, PROBE_STATES, PROBE_WORDS
from crformer_studies.variants import VARIANTS


def _mean_std(values: list) -> tuple:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


PROBES = list(PROBE_WORDS) + ["sentence_r2"]


def probe_states(run: dict) -> dict:
    """``{state: {probe: [score per layer]}}`` of a run file; files written before the probe read two
    states hold the layer outputs (the calibrated state) at the top level."""
    probe = run["probe"]
    if "calibrated" not in probe:
        return {"calibrated": {name: probe[name] for name in PROBES}}
    return {state: probe[state] for state in PROBE_STATES if state in probe}


def aggregate(runs: list) -> dict:
    """Mean ± std over seeds of every reported number, per variant (in VARIANTS order); the probe per
    state (``row["probe"][state][probe]`` = [(mean, std) per layer])."""
    out: dict = {}
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in runs)]:
        rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        row: dict = {"seeds": [r["seed"] for r in rs], "metrics": {}, "probe": {}}
        for split in METRIC_SPLITS:
            for key in ("oIoU", "mIoU"):
                row["metrics"][f"{split}/{key}"] = _mean_std([r["metrics"][split]["overall"][key] for r in rs])
            for kind in rs[0]["metrics"][split]["by_kind"]:
                if len(rs[0]["metrics"][split]["by_kind"]) > 1:
                    row["metrics"][f"{split}/{kind}/mIoU"] = _mean_std(
                        [r["metrics"][split]["by_kind"][kind]["mIoU"] for r in rs])
        states = [probe_states(r) for r in rs]
        for state in [s for s in PROBE_STATES if all(s in st for st in states)]:
            row["probe"][state] = {}
            for name in PROBES:
                per_seed = np.asarray([st[state][name] for st in states], dtype=float)  # seeds × layers
                row["probe"][state][name] = [_mean_std(per_seed[:, l]) for l in range(per_seed.shape[1])]
        if all("history" in r for r in rs):  # val mIoU after every epoch: when each variant learns
            row["curve"] = {"steps": [h["step"] for h in rs[0]["history"]]}
            for split in METRIC_SPLITS:
                per_seed = np.asarray([[h["val"][split]["mIoU"] for h in r["history"]] for r in rs], dtype=float)
                row["curve"][split] = [_mean_std(per_seed[:, e]) for e in range(per_seed.shape[1])]
        row["calibration"] = "model.calibration=false" not in rs[0]["overrides"]
        row["majority"] = rs[0]["probe"]["majority"]
        row["minutes_per_run"] = float(np.mean([r["seconds"] for r in rs])) / 60
        out[variant] = row
    return out


def _pm(ms: tuple, scale: float = 100.0) -> str:
    return f"{scale * ms[0]:.1f} ± {scale * ms[1]:.1f}"


def tables_markdown(agg: dict) -> str:
    """The metric table and the per-layer probe table, as markdown."""
    keys = list(next(iter(agg.values()))["metrics"])
    lines = ["Validation metrics (%, mean ± std over the seeds):", "",
             "| variant | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for v, row in agg.items():
        lines.append(f"| {v} | {len(row['seeds'])} | " + " | ".join(_pm(row["metrics"][k]) for k in keys) + " |")
    lines += ["", "Per-layer probe on the test splits (layer 0 = QGM queries; accuracy % / R² × 100, mean ± std "
              "over the seeds). Two states of each decoder layer: " + "; ".join(
                  f"`{PROBE_STATE_LABELS[s]}`" for s in PROBE_STATES) + ". A plain decoder has one state, its "
              f"output (`{PROBE_STATE_LABELS['plain']}`).", ""]
    lines.append("| variant | layer | state | " + " | ".join(PROBES) + " |")
    lines.append("|---|---|---|" + "---|" * len(PROBES))
    for v, row in agg.items():
        states = [s for s in PROBE_STATES if s in row["probe"]]
        for layer in range(len(row["probe"]["calibrated"]["colour"])):
            for state in states[:1] if layer == 0 else states:
                label = ("QGM queries" if layer == 0 else
                         PROBE_STATE_LABELS["plain" if not row["calibration"] else state])
                lines.append(f"| {v} | {layer} | {label} | " +
                             " | ".join(_pm(row["probe"][state][p][layer]) for p in PROBES) + " |")
    majority = next(iter(agg.values()))["majority"]
    lines += ["", "Majority-class accuracy of each word probe: " +
              ", ".join(f"{k} {100 * v:.1f}" for k, v in majority.items()) + "."]
    return "\n".join(lines) + "\n"


#: The study's contrasts, (what is tested, A, B): each claim as one difference A − B. At N_q = 16
#: calibration × LRM is a 2 × 2 design, so each of the two is tested with and without the other.
CONTRASTS = [
    ("calibration, LRM on", "crformer-nq16", "no-calibration"),
    ("calibration, LRM off", "no-lrm", "plain-nq16"),
    ("reconstruction loss (LRM), calibration on", "crformer-nq16", "no-lrm"),
    ("reconstruction loss (LRM), calibration off", "no-calibration", "plain-nq16"),
    ("both (full vs plain decoder, N_q = 16)", "crformer-nq16", "plain-nq16"),
    ("LRM reading the state before calibration", "lrm-pre-calibration", "crformer-nq16"),
    ("N_q = 16 vs 1", "crformer-nq16", "crformer-nq1"),
    ("N_q = 16 vs 4", "crformer-nq16", "crformer-nq4"),
    ("plain decoder, N_q = 16 vs 1", "plain-nq16", "plain"),
]


def _own_state(row: dict) -> str:
    """The state that shows what the decoder layers themselves keep: before calibration when there
    is one, else (plain decoder) the output."""
    return "pre" if "pre" in row["probe"] else "calibrated"


def _difference(a: tuple, na: int, b: tuple, nb: int) -> str:
    """A − B in points, ± the standard error of a difference of two means over seeds."""
    d, se = a[0] - b[0], (a[1] ** 2 / na + b[1] ** 2 / nb) ** 0.5
    return f"{100 * d:+.1f} ± {100 * se:.1f}"


def contrasts_markdown(agg: dict) -> str:
    """One row per contrast of :data:`CONTRASTS` whose two variants both ran: the difference of the
    seed means (A − B, points) ± its standard error, for the val mIoU of both splits and the last
    layer's sentence R² and spatial-word probe, in the decoder's own state and in its output."""
    cols = ["val_easy mIoU", "val_hard mIoU", "last layer R², own", "last layer spatial, own",
            "last layer R², output"]
    lines = ["Contrasts (A − B in points, ± standard error of the difference of the seed means; *own* = "
             "after the FFN, before calibration, or a plain decoder's output; *output* = after calibration):",
             "", "| contrast | A | B | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for what, a, b in CONTRASTS:
        if a not in agg or b not in agg:
            continue
        ra, rb = agg[a], agg[b]
        na, nb = len(ra["seeds"]), len(rb["seeds"])
        cells = [_difference(ra["metrics"][f"{s}/mIoU"], na, rb["metrics"][f"{s}/mIoU"], nb) for s in METRIC_SPLITS]
        for name, state in (("sentence_r2", None), ("spatial", None), ("sentence_r2", "calibrated")):
            sa, sb = state or _own_state(ra), state or _own_state(rb)
            cells.append(_difference(ra["probe"][sa][name][-1], na, rb["probe"][sb][name][-1], nb))
        lines.append(f"| {what} | {a} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(agg: dict, out: Path) -> None:
    """``metrics.png`` (val mIoU/oIoU per variant, error bars = std over seeds), ``curves.png`` (val
    mIoU after every epoch, when every run file has its history) and ``probe.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(agg)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.38
    for ax, key in zip(axes, ("mIoU", "oIoU")):
        for j, split in enumerate(METRIC_SPLITS):
            ms = [agg[v]["metrics"][f"{split}/{key}"] for v in variants]
            ax.bar(np.arange(len(variants)) + (j - 0.5) * width, [100 * m for m, _ in ms], width,
                   yerr=[100 * s for _, s in ms], capsize=3, label=split)
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_title(f"val {key} (%), mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)

    if all("curve" in agg[v] for v in variants):
        fig, axes = plt.subplots(1, len(METRIC_SPLITS), figsize=(11, 4), sharey=True)
        for ax, split in zip(axes, METRIC_SPLITS):
            for j, v in enumerate(variants):
                ms = agg[v]["curve"][split]
                ax.errorbar(np.asarray(agg[v]["curve"]["steps"]) + 6 * (j - len(variants) / 2),
                            [100 * m for m, _ in ms], yerr=[100 * s for _, s in ms], marker="o", capsize=2, label=v)
            ax.set_title(f"{split} mIoU (%) after each epoch, mean ± std over seeds", fontsize=9)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(PROBES), figsize=(4.4 * len(PROBES), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes, PROBES):
        for j, v in enumerate(variants):
            for state in [s for s in PROBE_STATES if s in agg[v]["probe"]]:
                ms = agg[v]["probe"][state][name]
                ax.errorbar(np.arange(len(ms)) + 0.04 * (j - len(variants) / 2), [100 * m for m, _ in ms],
                            yerr=[100 * s for _, s in ms], marker="o" if state == "calibrated" else "x",
                            ls="-" if state == "calibrated" else "--", color=colours[j % len(colours)],
                            capsize=2, label=v if state == "calibrated" else f"{v} (before calibration)")
        if name in agg[variants[0]]["majority"]:
            ax.axhline(100 * agg[variants[0]]["majority"][name], color="grey", ls=":", label="majority class")
        ax.set_title(f"{name} word probe (test acc. %)" if name != "sentence_r2"
                     else "sentence feature read-out (R² × 100)", fontsize=9)
        ax.set_xlabel("layer (0 = QGM); bars: std over seeds")
        ax.set_xticks(range(len(agg[variants[0]]["probe"]["calibrated"][name])))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("solid: layer output (after calibration; plain decoders: their only state), "
                 "dashed: after the FFN, before calibration", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=120)
    plt.close(fig)


def report(out: Path) -> dict:
    """Aggregate every run file under ``out/runs`` into results.json, tables.md and the plots."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    if not runs:
        raise UserError(f"no finished runs under {out / 'runs'}")
    agg = aggregate(runs)
    (out / "results.json").write_text(json.dumps(agg, indent=1))
    (out / "tables.md").write_text(tables_markdown(agg) + "\n" + contrasts_markdown(agg))
    plot(agg, out)
    return agg
