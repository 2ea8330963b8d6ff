import pytest
import yaml

from crformer.config import DEFAULTS, PRE_KEY_VALUES, load_config, merge_config, parse_override
from crformer.errors import UserError


def test_defaults_are_a_fresh_copy():
    cfg = load_config()
    cfg["model"]["num_queries"] = 99
    assert DEFAULTS["model"]["num_queries"] != 99
    assert load_config()["model"]["num_queries"] == DEFAULTS["model"]["num_queries"]


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config(None, ["model.num_queries=1", "model.calibration=false", "model.backbone.depths=[1,2,3,4]",
                             "train.lr=3e-4", "data.root=/some/where"])
    assert cfg["model"]["num_queries"] == 1
    assert cfg["model"]["calibration"] is False
    assert cfg["model"]["backbone"]["depths"] == [1, 2, 3, 4]
    assert cfg["train"]["lr"] == pytest.approx(3e-4)
    assert cfg["data"]["root"] == "/some/where"


@pytest.mark.parametrize("bad", ["model.num_querys=3", "nosuch.key=1", "model=3", "model.backbone.depth=[1]"])
def test_unknown_or_misshapen_key_is_a_user_error(bad):
    with pytest.raises(UserError) as e:
        load_config(None, [bad])
    assert "config key" in str(e.value)


def test_yaml_file_and_unknown_key_in_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  d_model: 64\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(good), ["train.epochs=3"])
    assert cfg["model"]["d_model"] == 64 and cfg["train"]["epochs"] == 3  # overrides beat the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dmodel: 64\n")
    with pytest.raises(UserError, match="model.dmodel"):
        load_config(str(bad))
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_override_needs_equals_and_merge_keeps_checkpoint_values():
    with pytest.raises(UserError):
        parse_override("model.d_model")
    saved = load_config(None, ["model.d_model=64"])
    assert merge_config(saved, ["train.epochs=1"])["model"]["d_model"] == 64


def test_paper_configs_load(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("refcoco_swinb.yaml", "refcocoplus_swinb.yaml", "refcocog_umd_swinb.yaml"):
        cfg = load_config(str(root / name))
        assert cfg["data"]["image_size"] == 480
        assert cfg["model"]["backbone"]["window_size"] == 12
        assert cfg["train"]["lr"] == pytest.approx(5e-5) and cfg["train"]["epochs"] == 40
        assert cfg["train"]["batch_size"] == 32
        assert cfg["model"]["position_frequencies"] == 0 and cfg["train"]["lr_hold"] == 0  # the paper's recipe


#: Each key of PRE_KEY_VALUES: its value for old checkpoints, and another valid value.
PRE_KEY_CASES = [("model", "mask_stride", 4, 2), ("model", "position_frequencies", 0, 2), ("train", "lr_hold", 0.0, 0.25)]


@pytest.mark.parametrize(("section", "key", "old", "other"), PRE_KEY_CASES)
def test_checkpoint_config_without_a_later_key_rebuilds_the_old_model(section, key, old, other):
    assert PRE_KEY_VALUES[(section, key)] == old != DEFAULTS[section][key]
    saved = load_config()
    del saved[section][key]  # a checkpoint written before the key existed
    assert merge_config(saved)[section][key] == old
    assert merge_config(saved, [f"{section}.{key}={other}"])[section][key] == other
    assert merge_config(load_config())[section][key] == DEFAULTS[section][key]


def test_every_pre_key_value_has_a_case():
    assert {(section, key) for section, key, _, _ in PRE_KEY_CASES} == set(PRE_KEY_VALUES)


def test_yaml_refuses_aliases_and_repeated_keys_and_quotes_short():
    from crformer.config import load_yaml, quote

    for text in ("a: &x 1\nb: *x\n", "a: 1\na: 2\n", "s:\n  k: 1\ns:\n  j: 2\n"):
        with pytest.raises(yaml.YAMLError):
            load_yaml(text)
    assert load_yaml("a: [1, 2]\nb: {c: 3}\n") == {"a": [1, 2], "b": {"c": 3}}
    assert len(quote("x" * 10**6)) < 100 and quote("short") == "'short'"


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=nan", "loss.aux_weight=-.inf",
                                      "train.epochs=99999999999", "data.synthetic.eval_samples=1000000",
                                      "data.one_attr_fraction=1.5", "data.one_attr_fraction=-0.1"])
def test_numbers_are_finite_and_bounded(override):
    with pytest.raises(UserError, match=override.split("=")[0]):
        load_config(None, [override])


def test_a_checkpoint_config_chooses_neither_folders_nor_sizes():


    saved = load_config(None, ["train.out_dir=/elsewhere/run", "data.cache_dir=/elsewhere/cache",
                               "data.synthetic.train_images=5000"])
    with pytest.raises(UserError, match="data.synthetic.train_images=5000"):
        merge_config(saved)
    cfg = merge_config(saved, ["data.synthetic.train_images=5000"], out_dir="here")
    assert cfg["train"]["out_dir"] == "here" and cfg["data"]["cache_dir"] == DEFAULTS["data"]["cache_dir"]
    small = load_config(None, ["data.synthetic.train_images=24"])
    assert merge_config(small)["data"]["synthetic"]["train_images"] == 24
