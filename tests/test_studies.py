"""The ablation study beside the library (crformer_studies): probe helpers on known answers, and the
whole study on a tiny setting."""

from __future__ import annotations

import json

import torch

from crformer_studies import ablation
from crformer_studies.probe import PROBE_WORDS, linear_probe_accuracy, ridge_r2, word_label
from crformer_studies.report import contrasts_markdown


def test_word_label_finds_the_first_word_or_none():
    colour, shape, spatial = PROBE_WORDS["colour"], PROBE_WORDS["shape"], PROBE_WORDS["spatial"]
    assert word_label("the leftmost red circle", colour) == colour.index("red")
    assert word_label("the leftmost red circle", spatial) == spatial.index("leftmost")
    s = "the square above the green circle"
    assert word_label(s, shape) == shape.index("square")
    assert word_label(s, colour) == colour.index("green")
    assert word_label(s, spatial) == spatial.index("above")
    assert word_label("the small purple shape right of the star", spatial) == spatial.index("right of")
    assert word_label("the star", colour) == len(colour)  # none
    assert word_label("the starry thing", shape) == len(shape)  # whole words only


def test_linear_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 16, generator=g, dtype=torch.float64)
    assert linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:], 4) > 0.95
    noise = torch.randn(400, 16, generator=g, dtype=torch.float64)
    assert linear_probe_accuracy(noise[:200], y[:200], noise[200:], y[200:], 4) < 0.45


def test_ridge_r2_recovers_a_linear_map_and_not_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    t = x @ w + 3.0
    assert ridge_r2(x[:200], t[:200], x[200:], t[200:], l2=1e-6) > 0.999
    unrelated = torch.randn(300, 20, generator=g, dtype=torch.float64)
    assert ridge_r2(x[:200], unrelated[:200], x[200:], unrelated[200:]) < 0.05


def test_the_lrm_reads_the_configured_decoder_state(tiny):
    from crformer.config import load_config
    from crformer.models.crformer import CRFormer

    def lrm_input_and_state(lrm_input: str, state: str) -> tuple:
        """The LRM's input and the output of the last decoder layer's submodule ``state``."""
        torch.manual_seed(0)
        model = CRFormer.from_config(load_config(None, tiny + [f"model.lrm_input={lrm_input}"]), "cpu").train()
        seen = {}
        model.lrm.register_forward_hook(lambda m, i, o: seen.update(lrm=i[0]))
        getattr(model.decoder.layers[-1], state).register_forward_hook(lambda m, i, o: seen.update(state=o))
        model(torch.randn(2, 3, 32, 32), torch.full((2, 20), 1000), torch.ones(2, 20, dtype=torch.bool))
        return seen["lrm"], seen["state"]

    assert torch.equal(*lrm_input_and_state("calibrated", "calibration"))  # the layer's output
    assert torch.equal(*lrm_input_and_state("pre_calibration", "ffn"))  # before its calibration


def test_study_runs_end_to_end_on_a_tiny_setting(tiny, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--out", str(out), "--work-dir", str(work), "--seeds", "0,1", "--variants", "plain,crformer-nq16",
            *tiny, "train.epochs=1"]
    ablation.main(args)
    ablation.main(["--out", str(out), "--work-dir", str(work), "--seeds", "0", "--variants",
                 "plain-nq16,lrm-pre-calibration", *tiny, "train.epochs=1"])
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["crformer-nq16-s0.json", "crformer-nq16-s1.json", "lrm-pre-calibration-s0.json",
                    "plain-nq16-s0.json", "plain-s0.json", "plain-s1.json"]
    agg = json.loads((out / "results.json").read_text())
    assert list(agg) == ["crformer-nq16", "lrm-pre-calibration", "plain-nq16", "plain"]  # the VARIANTS order
    for name, row in agg.items():
        assert row["seeds"] == ([0] if name in ("plain-nq16", "lrm-pre-calibration") else [0, 1])
        for key in ("val_easy/mIoU", "val_hard/oIoU", "val_hard/relational/mIoU"):
            mean, std = row["metrics"][key]
            assert 0.0 <= mean <= 1.0 and std >= 0.0
        # Both states of a calibrated decoder's layers, one of a plain decoder's; each: layer 0 (QGM)
        # + the tiny model's 2 decoder layers.
        assert row["calibration"] == (not name.startswith("plain"))
        assert list(row["probe"]) == (["calibrated", "pre"] if row["calibration"] else ["calibrated"])
        for state in row["probe"].values():
            assert all(len(state[p]) == 3 for p in ("colour", "shape", "spatial", "sentence_r2"))
        if row["calibration"]:  # the same QGM queries at layer 0, different states after
            assert row["probe"]["pre"]["sentence_r2"][0] == row["probe"]["calibrated"]["sentence_r2"][0]
            assert row["probe"]["pre"]["sentence_r2"][1:] != row["probe"]["calibrated"]["sentence_r2"][1:]
    run = json.loads((out / "runs" / "plain-s0.json").read_text())
    assert "model.calibration=false" in run["overrides"] and "train.epochs=1" in run["overrides"]
    assert "model.num_queries=16" in json.loads((out / "runs" / "plain-nq16-s0.json").read_text())["overrides"]
    assert "model.lrm_input=pre_calibration" in json.loads(
        (out / "runs" / "lrm-pre-calibration-s0.json").read_text())["overrides"]
    tables = (out / "tables.md").read_text()
    assert "| plain | 2 |" in tables and "| plain-nq16 | 1 |" in tables and "| lrm-pre-calibration | 1 |" in tables
    assert "| crformer-nq16 | 0 | QGM queries |" in tables
    for state in ("after calibration (output)", "after FFN, before calibration"):
        assert f"| crformer-nq16 | 2 | {state} |" in tables
        assert f"| plain-nq16 | 2 | {state} |" not in tables
    assert "| plain-nq16 | 2 | output (no calibration: one state) |" in tables
    assert "| both (full vs plain decoder, N_q = 16) | crformer-nq16 | plain-nq16 |" in tables
    assert "| plain decoder, N_q = 16 vs 1 | plain-nq16 | plain |" in tables
    assert "| calibration, LRM on |" not in tables  # no-calibration did not run
    for row in agg.values():  # one epoch: the curve's one point is the final model's val mIoU (rounded to 1e-4)
        assert len(row["curve"]["steps"]) == 1 and len(row["curve"]["val_hard"]) == 1
        assert abs(row["curve"]["val_hard"][0][0] - row["metrics"]["val_hard/mIoU"][0]) <= 5e-5
    for name in ("metrics.png", "probe.png", "curves.png"):
        assert (out / name).stat().st_size > 1000

    # Same seed → the same numbers (training is deterministic); finished runs are skipped, and a
    # run made with another setting is redone.
    stale = dict(run, overrides=run["overrides"][:-1])
    (out / "runs" / "plain-s0.json").write_text(json.dumps(stale))
    capsys.readouterr()
    ablation.main(args)
    printed = capsys.readouterr().out
    assert "crformer-nq16 seed 0: done already" in printed and "plain seed 0: " in printed
    assert "made with another setting; retraining" in printed
    again = json.loads((out / "runs" / "plain-s0.json").read_text())
    assert again["metrics"] == run["metrics"] and again["probe"] == run["probe"]
    ablation.main(["--out", str(out), "--report-only"])
    assert (out / "tables.md").read_text() == tables
    # Re-probing from the saved final checkpoints reproduces the inline probe.
    ablation.main(["--out", str(out), "--work-dir", str(work), "--reprobe"])
    assert json.loads((out / "runs" / "plain-s0.json").read_text())["probe"] == again["probe"]


def test_contrasts_are_differences_of_seed_means_with_their_standard_error():
    def row(hard, r2_pre, r2_out, n, calibration=True):
        probe = {"calibrated": {"sentence_r2": [(0.9, 0.0), r2_out], "spatial": [(0.9, 0.0), (0.8, 0.0)]}}
        if calibration:
            probe["pre"] = {"sentence_r2": [(0.9, 0.0), r2_pre], "spatial": [(0.9, 0.0), (0.7, 0.0)]}
        return {"seeds": list(range(n)), "probe": probe,
                "metrics": {"val_easy/mIoU": (0.80, 0.0), "val_hard/mIoU": hard}}

    agg = {"crformer-nq16": row((0.50, 0.03), (0.86, 0.02), (0.95, 0.01), 3),
           "plain-nq16": row((0.65, 0.04), None, (0.70, 0.02), 3, calibration=False)}
    table = contrasts_markdown(agg)
    cells = [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]]
    se_hard = 100 * (0.03 ** 2 / 3 + 0.04 ** 2 / 3) ** 0.5
    assert cells[:3] == ["both (full vs plain decoder, N_q = 16)", "crformer-nq16", "plain-nq16"]
    assert cells[3] == "+0.0 ± 0.0" and cells[4] == f"-15.0 ± {se_hard:.1f}"
    # own state: before calibration for the full model, the output for the plain decoder
    assert cells[5].startswith("+16.0 ±") and cells[6] == "-10.0 ± 0.0" and cells[7].startswith("+25.0 ±")
