"""The seed sweep: its table and verdicts on made-up runs, and the command on a tiny setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crformer import sweep
from crformer.process import run
from tests.helpers import TINY_MODEL


def fake_run(seed=0, threads=1, easy=0.95, hard=0.85, old=(0.01, 0.02), hard_by_epoch=(0.4, 0.75, 0.85)) -> dict:
    """A run file's content as :func:`crformer.runs.train_and_measure` writes it (the parts the sweep reads)."""
    kinds = {"relational": 0.81, "superlative": 0.79, "two-attr": 0.9}
    metrics = {"val_easy": {"overall": {"mIoU": easy}, "by_kind": {"one-attr": {"mIoU": easy}}},
               "val_hard": {"overall": {"mIoU": hard}, "by_kind": {k: {"mIoU": v} for k, v in kinds.items()}}}
    for split, value in zip(metrics, old):
        if value is not None:
            metrics[split]["language_check"] = {"new_target_mIoU": 0.9, "old_target_mIoU": value, "n": 300}
    history = [{"epoch": e, "step": 10 * e, "val": {"val_easy": {"mIoU": easy}, "val_hard": {"mIoU": h}}}
               for e, h in enumerate(hard_by_epoch, 1)]
    return {"threads": threads, "seed": seed, "overrides": [], "metrics": metrics, "seconds": 601.4, "steps": 30,
            "history": history}


def cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_first_epoch_over_the_threshold():
    history = fake_run(hard_by_epoch=(0.5, 0.69, 0.70, 0.9, 0.65))["history"]
    assert sweep.first_epoch_over(history, 0.70) == 3  # reached exactly counts; later drops do not matter
    assert sweep.first_epoch_over(history, 0.95) is None
    assert sweep.first_epoch_over(history, 0.60, split="val_easy") == 1


def test_missed_targets_name_each_miss():
    assert sweep.missed_targets(fake_run()) == []
    assert sweep.missed_targets(fake_run(easy=0.929)) == ["easy"]
    assert sweep.missed_targets(fake_run(hard=0.819, old=(0.06, 0.01))) == ["hard", "old target"]  # easy split's too
    assert sweep.missed_targets(fake_run(old=(0.01, 0.051))) == ["old target"]
    assert sweep.missed_targets(fake_run(old=(None, None))) == ["old target"]  # not measured: not met
    assert sweep.missed_targets(fake_run(easy=0.93, hard=0.82, old=(0.05, 0.05))) == []  # the bounds themselves pass


def test_table_rows_columns_and_summary():
    runs = [fake_run(seed=1, threads=2, hard=0.56, old=(0.01, 0.13), hard_by_epoch=(0.4, 0.5, 0.56)),
            fake_run(seed=1, threads=1), fake_run(seed=0, threads=2, hard=0.90),
            fake_run(seed=0, threads=1, hard=0.80)]
    lines = sweep.table_markdown(runs).splitlines()
    assert cells(lines[0]) == ["seed", "threads", "easy", "hard", "relational", "superlative", "two-attr",
                               "old target (hard)", "hard ≥ 70% at epoch", "seconds", "targets"]
    rows = [cells(line) for line in lines[2:6]]
    assert [r[:2] for r in rows] == [["0", "1"], ["0", "2"], ["1", "1"], ["1", "2"]]  # by seed, then threads
    assert rows[0] == ["0", "1", "95.0", "80.0", "81.0", "79.0", "90.0", "2.0", "2", "601", "missed: hard"]
    assert rows[1][-1] == "met" and rows[2][-1] == "met"
    assert rows[3][3] == "56.0" and rows[3][7] == "13.0" and rows[3][8] == "never"
    assert rows[3][-1] == "missed: hard, old target"
    assert lines[6] == ""
    assert lines[7] == ("4 runs: hard mIoU min 56.0, median 82.5 (target ≥ 86); every target met (easy ≥ 93, "
                        "hard ≥ 82, old-target IoU ≤ 5 on both val splits) by 2 of 4: NOT all pass")
    assert sweep.summary_line([fake_run(hard=0.86), fake_run(seed=1, hard=0.9)]).endswith("by 2 of 2: all pass")
    # every run passes, the median does not
    assert sweep.summary_line([fake_run(hard=0.85), fake_run(seed=1, hard=0.86)]).endswith("by 2 of 2: NOT all pass")


@pytest.mark.parametrize("args, message", [
    (["train.seed=3"], "the sweep sets train.seed, train.num_threads, train.out_dir itself"),
    (["train.num_threads=2"], "the sweep sets"),
    (["--threads", "0"], "thread counts start at 1"),
    (["--threads", "one"], "not a comma-separated list of integers"),
    (["--jobs", "0"], "--jobs 0: at least 1"),
    (["--seeds", "-1"], "train.seed"),
    (["model.no_such_key=1"], "model.no_such_key"),
])
def test_bad_arguments_are_one_line_errors_before_any_run(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(sweep.main, ["--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_sweep_runs_end_to_end_and_resumes(data_cache, tmp_path, capfd):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--seeds", "0,1,0", "--threads", "1", "--jobs", "1", "--out", str(out), "--work-dir", str(work),
            *TINY_MODEL, f"data.cache_dir={data_cache}", "train.epochs=1"]
    tqdm_setting = os.environ.get("TQDM_DISABLE")
    run(sweep.main, args)
    printed, err = capfd.readouterr()
    assert "it/s" not in err and "s/it" not in err  # the workers' progress bars are off...
    assert os.environ.get("TQDM_DISABLE") == tqdm_setting  # ...and this process's setting is back
    assert sorted(p.name for p in out.iterdir()) == ["s0-t1.json", "s1-t1.json", "table.md"]  # seed 0 once
    assert sorted(p.name for p in work.iterdir()) == ["s0-t1", "s1-t1"]  # checkpoints and logs
    table = (out / "table.md").read_text()
    assert table in printed
    lines = table.splitlines()
    assert cells(lines[0]) == sweep.COLUMNS and len(lines) == 6  # header, rule, 2 runs, blank, summary
    assert [cells(line)[:2] for line in lines[2:4]] == [["0", "1"], ["1", "1"]]
    assert lines[5].startswith("2 runs: hard mIoU min ")
    for name in ("s0-t1", "s1-t1"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["threads"] == 1 and result["overrides"][-1] == "train.num_threads=1"
        assert "probe" not in result  # the study's probe is not the sweep's business
        hard = result["metrics"]["val_hard"]
        assert set(hard["by_kind"]) == set(sweep.HARD_KINDS) and 0 <= hard["language_check"]["old_target_mIoU"] <= 1
        # the per-epoch val history by kind (one epoch here)
        (epoch,) = result["history"]
        assert set(epoch["val_by_kind"]["val_hard"]) == set(sweep.HARD_KINDS)
        assert epoch["val"]["val_hard"]["mIoU"] == round(hard["overall"]["mIoU"], 4)
    assert json.loads((out / "s0-t1.json").read_text())["seed"] == 0

    run(sweep.main, args)  # everything done: nothing trains, the same table
    printed = capfd.readouterr().out
    assert "seed 0, 1 thread: done already" in printed and "seed 1, 1 thread: done already" in printed
    assert "[1/" not in printed and (out / "table.md").read_text() == table


@pytest.mark.parametrize("to_group, status, last_line", [(False, 143, "terminated"), (True, 130, "interrupted")],
                         ids=["sigterm-to-the-sweep", "ctrl-c-to-the-terminal-group"])
def test_a_stop_ends_the_sweep_and_its_workers_at_once(data_cache, tmp_path, to_group, status, last_line):
    """SIGTERM reaches the sweep's own process only, Ctrl-C every process of the terminal's group; either way
    the running run ends with the sweep and the queued one never starts (before: SIGTERM waited for every
    run; Ctrl-C started the run queued behind the interrupted one)."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "crformer.sweep", "--seeds", "0,1", "--threads", "1", "--jobs", "1",
                             "--out", str(out), "--work-dir", str(work), *TINY_MODEL,
                             f"data.cache_dir={data_cache}", "train.epochs=200"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (work / "s0-t1" / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)  # the first run is training
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        children = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert children
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status and err.strip().splitlines()[-1] == last_line, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert not (work / "s1-t1").exists() and not list(out.glob("*.json"))
