"""Config loading, validation and overrides."""

from __future__ import annotations

import pytest
import yaml

from trunet.errors import ConfigError
from trunet.config import Config, config_from_dict, load_config, save_config


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml", "tiny.yaml"])
def test_shipped_configs_load(configs_dir, name):
    config = load_config(configs_dir / name)
    assert isinstance(config, Config)
    assert len(config.model.strides) == len(config.model.channels) - 1


def test_overrides_are_typed(configs_dir):
    config = load_config(
        configs_dir / "demo.yaml",
        ["train.lr=0.5", "train.patch_size=[32,32,4]", "model.clstm_levels=bottleneck", "data.root=/x"],
    )
    assert config.train.lr == 0.5
    assert config.train.patch_size == (32, 32, 4)
    assert config.model.clstm_levels == "bottleneck"
    assert config.data.root == "/x"


def test_int_promotes_to_float_but_not_the_reverse(configs_dir):
    assert load_config(configs_dir / "tiny.yaml", ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"'train.epochs' must be an integer"):
        load_config(configs_dir / "tiny.yaml", ["train.epochs=1.5"])


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "train.learning_rate" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  amp: yes-please\n", "train.amp"),
        ("train:\n  patch_size: [64, 64]\n", "train.patch_size"),
        ("train:\n  optimizer: adam\n", "train.optimizer"),
        ("model:\n  clstm_levels: some\n", "model.clstm_levels"),
        ("model:\n  channels: [8, 16]\n  strides: [[2,2,1],[2,2,1]]\n", "model.strides"),
        ("train:\n  batch_size: 0\n", "train.batch_size"),
        ("infer:\n  overlap: 1.0\n", "infer.overlap"),
        ("data: [1, 2]\n", "data"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.lr"])


def test_save_roundtrip(tmp_path, configs_dir):
    config = load_config(configs_dir / "default.yaml", ["train.epochs=3"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    again = config_from_dict(yaml.safe_load(path.read_text()), str(path))
    assert again == config
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_patch_is_checked_against_the_model_when_the_config_loads(configs_dir):
    with pytest.raises(ConfigError) as info:
        load_config(configs_dir / "tiny.yaml", ["train.patch_size=[30,32,4]"])  # tiny: size divisor (4, 4, 2)
    message = str(info.value)
    assert "'train.patch_size' [30, 32, 4] does not fit the model" in message and "(4, 4, 2)" in message
    assert "X=30 is not a multiple of 4 (nearest that work: 28 or 32)" in message
    assert config_from_dict({"model": {"strides": [[2, 2, 1]] * 4}}).model.size_divisor == (16, 16, 1)


def test_config_for_model_takes_the_patch_from_the_model():
    from trunet.config import config_for_model

    model = {"channels": [4, 8, 16, 32, 64, 128, 256], "strides": [[2, 2, 1]] * 6}  # divisor 64: no default
    with pytest.raises(ConfigError):
        config_from_dict({"model": model})  # the default patch (160, 160, 8) does not fit
    config = config_for_model(model, "checkpoint", data={"classes": ["bg", "LV"]})
    assert config.train.patch_size == (64, 64, 1) and config.data.classes == ["bg", "LV"]
