"""Result rows: running a case into a row, formatting, markdown tables, the JSON + markdown written
under ``benchmarks/results/``, and the command-line arguments every script shares."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from .device import Device, RESULTS_DIR
from .timing import peak_mb, time_graph_ms, time_ms


def fmt(v, spec: str, none: str = "—") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def finish_rows(rows: list[dict], dev: Device, group_keys=("case", "pass")) -> None:
    """Fill GB/s, % of floor and speed-up over the best peer (best *other* backend, same case/pass),
    for the eager time and, where measured, for the graph time (``graph_`` prefix)."""
    for r in rows:
        r["floor_us"] = r["bytes"] / dev.bandwidth * 1e6 if dev.bandwidth and r.get("bytes") else None
        for pre in ("", "graph_"):
            ms = r.get(pre + "ms")
            r[pre + "GBps"] = r["bytes"] / (ms * 1e-3) / 1e9 if ms and r.get("bytes") else None
            r[pre + "pct_floor"] = 100 * r["floor_us"] / (ms * 1e3) if r["floor_us"] and ms else None
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    for g in groups.values():
        for r in g:
            for pre in ("", "graph_"):
                peers = [o[pre + "ms"] for o in g if o is not r and o.get(pre + "ms")]
                mine = r.get(pre + "ms")
                r[pre + "speedup_vs_best_peer"] = min(peers) / mine if peers and mine else None


COLUMNS = [("case", "case", "s"), ("backend", "backend", "s"), ("pass", "pass", "s"), ("ms", "median ms", ".4f"),
           ("GBps", "GB/s", ".1f"), ("pct_floor", "% floor", ".1f"), ("speedup_vs_best_peer", "× best peer", ".2f"),
           ("peak_MB", "peak MB", ".1f")]
GRAPH_COLUMNS = [("graph_ms", "graph ms", ".4f"), ("graph_pct_floor", "% floor (graph)", ".1f"),
                 ("graph_speedup_vs_best_peer", "× best peer (graph)", ".2f")]


def columns_for(rows: list[dict], columns=COLUMNS) -> list[tuple]:
    """``columns`` plus the graph-timing columns when any row has a graph time (CUDA runs)."""
    columns = list(columns)
    if any(r.get("graph_ms") for r in rows):
        columns += [c for c in GRAPH_COLUMNS if c not in columns]
    return columns


def table(rows: list[dict], columns=COLUMNS) -> str:
    """Markdown table (also readable on a terminal); a failed or skipped row shows its note."""
    columns = columns_for(rows, columns)
    head = "| " + " | ".join(h for _, h, _ in columns) + " | note |"
    sep = "|" + "|".join("---" for _ in range(len(columns) + 1)) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [fmt(r.get(k), s) if s != "s" else str(r.get(k, "")) for k, _, s in columns]
        lines.append("| " + " | ".join(cells) + f" | {r.get('note', '')} |")
    return "\n".join(lines)


def run_case(rows: list[dict], dev: Device, case: str, backend: str, passname: str, fn: Callable[[], object],
             nbytes_: int, quick: bool, extra: Optional[dict] = None, timer=time_ms) -> dict:
    """Time ``fn`` (errors become a note, never a crash) and append the row."""
    row = {"case": case, "backend": backend, "pass": passname, "bytes": nbytes_, "ms": None, "peak_MB": None,
           "graph_ms": None, **(extra or {})}
    try:
        row["ms"] = timer(fn, dev, quick) if timer is time_ms else timer(fn, dev)
        row["peak_MB"] = peak_mb(fn, dev)
    except Exception as e:  # a peer that cannot run this shape: record why and go on
        row["note"] = f"error: {_first_line(e)}"
        if dev.cuda:
            torch.cuda.synchronize()
    if dev.cuda and timer is time_ms and row["ms"] is not None:
        try:
            row["graph_ms"] = time_graph_ms(fn, quick)
        except Exception as e:  # e.g. a peer that syncs with the host cannot be captured
            row["note"] = f"graph: {_first_line(e)}"
            torch.cuda.synchronize()
    rows.append(row)
    ms, gms = fmt(row["ms"], ".4f"), fmt(row["graph_ms"], ".4f")
    graph = f" (graph {gms} ms)" if dev.cuda else ""
    print(f"  {case:<28} {backend:<18} {passname:<8} {ms:>10} ms{graph} {row.get('note', '')}", flush=True)
    return row


def rehearsal_failures(dev: Device, rows: list[dict]) -> int:
    """Exit status of a benchmark: in a rehearsal every row must run (an error note is a failure: on CPU at toy
    sizes nothing is expected to fail), so 1 if any did not; elsewhere 0 (a peer that cannot run a shape on a
    GPU is a result, recorded in its row)."""
    failed = [r for r in rows if "error" in r.get("note", "")] if dev.rehearse else []
    for r in failed:
        print(f"REHEARSAL FAILED: {r['case']} / {r['backend']} / {r['pass']}: {r['note']}", flush=True)
    return 1 if failed else 0


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def skip(rows: list[dict], case: str, backend: str, passname: str, why: str) -> None:
    """Append a row that says why it was not run, and say so on the console."""
    rows.append({"case": case, "backend": backend, "pass": passname, "bytes": None, "ms": None,
                 "peak_MB": None, "note": f"skipped: {why}"})
    print(f"  {case:<28} {backend:<18} {passname:<8} skipped: {why}", flush=True)


def add_rehearse_arg(ap) -> None:
    ap.add_argument("--rehearse", action="store_true",
                    help="CPU rehearsal of benchmarks/run_gpu_suite.sh: implies --quick --cpu, one timed repetition, "
                         "triton interpreted where TRITON_INTERPRET=1 is set; proves the command, not a number")


def add_common_args(ap) -> None:
    add_rehearse_arg(ap)
    ap.add_argument("--quick", action="store_true", help="tiny shapes / few repetitions (CPU run < ~30 s)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR), help="where <device>-<date>.json/.md go")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def setup(args) -> Device:
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args.quick = args.quick or args.rehearse  # the scripts choose their tiny CPU shapes by --quick
    return Device(force_cpu=args.cpu, rehearse=args.rehearse)


def save(out_dir: str, dev: Device, section: str, rows: list[dict], notes: list[str], columns=COLUMNS) -> Path:
    """Merge ``section`` into ``<out_dir>/<slug>-<date>.json`` (other scripts' sections are kept) and
    rewrite the markdown next to it with every section. Returns the JSON path."""
    columns = columns_for(rows, columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{dev.slug}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d')}"
    path = out / f"{stem}.json"
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data["meta"] = dev.meta()
    data.setdefault("sections", {})[section] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes, "columns": [list(c) for c in columns], "rows": rows}
    path.write_text(json.dumps(data, indent=1, default=str))
    write_markdown(path)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return path


def write_markdown(path: Path) -> None:
    """Render a results JSON (every section) as the markdown file next to it."""
    data = json.loads(Path(path).read_text())
    meta = data["meta"]
    md = [f"# Benchmarks on {meta['device']} ({Path(path).stem})", "", f"torch {meta.get('torch')}, triton "
          f"{meta.get('triton', '—')}, {meta['dtype']}; floor: {meta['bandwidth_note']}", ""]
    for name, sec in data["sections"].items():
        cols = [tuple(c) for c in sec["columns"]]
        md += [f"## {name}", "", f"`{sec['command']}` at {sec['time_utc']}", ""]
        md += [f"- {n}" for n in sec["notes"]] + [""]
        md += [table(sec["rows"], cols), ""]
    Path(path).with_suffix(".md").write_text("\n".join(md))
