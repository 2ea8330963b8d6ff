"""crformer_studies.escape_probe: the group a spatial sentence names, the objects' words read back from
the images, and a probed run that is the plain run."""

from __future__ import annotations

import json
import math

from crformer.config import load_config
from crformer.data import open_refer
from crformer.data.synthetic import COLORS
from crformer.train import Trainer
from crformer_studies.escape_probe import SPATIAL_KINDS, group_word, main, object_words


def test_group_word_is_the_noun_phrase_word_that_names_the_group():
    assert group_word("the leftmost circle") == "circle"
    assert group_word("the topmost small shape") == "small"
    assert group_word("the rightmost red shape") == "red"
    assert group_word("the red shape left of the blue star") == "red"
    assert group_word("the square above the small green circle") == "square"
    assert group_word("the large shape below the star") == "large"


def test_object_words_match_every_sentence_of_the_data(tiny):
    """Every one-word sentence ("the red shape", "the star") of the tiny data's easy split names a word
    that its target has and that no other object of its image has: shapes, colours from the pixels and
    sizes from the areas are read back right."""
    cfg = load_config(None, tiny)
    refer = open_refer(cfg)
    checked = 0
    for s in refer.samples("val_easy"):
        word = s.sentence.split()[1] if s.sentence.split()[-1] == "shape" else s.sentence.split()[-1]
        anns = [a for a in refer.anns.values() if int(a["image_id"]) == s.image_id]
        objects = object_words(refer, s.image_id, anns, s.width)
        assert [a for a, (_, words) in objects.items() if word in words] == [s.ann_id], s.sentence
        checked += word in COLORS
    assert checked  # colours were among them


def _log(run_dir) -> list:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def test_a_probed_run_is_the_plain_run_and_records_what_it_promises(tiny, tmp_path):
    # drop path on: the training draws random numbers, which the probe's evaluation must not shift
    overrides = [o for o in tiny if not o.startswith("train.out_dir")] + ["train.epochs=2",
                                                                           "model.backbone.drop_path_rate=0.2"]
    Trainer(load_config(None, overrides + [f"train.out_dir={tmp_path / 'plain'}"])).fit()
    main(["--out", str(tmp_path / "probe"), "--every", "1", *overrides])
    plain, probed = _log(tmp_path / "plain"), _log(tmp_path / "probe" / "run")
    assert plain == probed and any("val" in r for r in plain)  # every loss term and val metric, bit for bit
    records = [json.loads(line) for line in (tmp_path / "probe" / "probe.jsonl").read_text().splitlines()]
    steps, epochs = [r for r in records if "step" in r], [r for r in records if "epoch" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and len(epochs) == 2
    first = steps[0]
    assert {"backbone", "decoder", "mask_head", "qgm", "pixel_decoder"} <= set(first["grad_norm"])
    # every module trains: a norm above zero at some step (at the first, the confidences' and so the
    # sentence projection's gradient is ≈ 1e-8 or exactly 0, the tiny model's queries being alike)
    assert all(max(r["grad_norm"][m] for r in steps) > 0 for m in first["grad_norm"]), [r["grad_norm"] for r in steps]
    assert set(first["query spread"]) == {"qgm", "decoder"}, first["query spread"]
    # the tiny model's stride-32 map is 1×1: every QGM query pools the same vector; the decoder's
    # learned query positions make them differ
    assert first["query spread"]["qgm"] == 0 and first["query spread"]["decoder"] > 0, first["query spread"]
    for kind in first["by_kind"].values():
        assert 0 < kind["query entropy"] <= math.log(4) + 1e-4  # rounded to 4 places; the tiny model's 4 queries
        assert 0.25 <= kind["top query weight"] <= 1
    for kind in SPATIAL_KINDS:
        where = epochs[-1]["where masks lie"][kind]
        assert where["n"] > 0 and where["target in its group"] == 1.0 and where["group size"] >= 2
        assert where["share on target"] + where["share on other members"] <= 1 + 1e-9
        assert abs(sum(where[k] for k in ("is target", "is another member", "spread over group", "other")) - 1) < 1e-3
