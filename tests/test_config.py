"""Config schema: YAML + dotted overrides, and every bad key or value rejected with the key named."""
from pathlib import Path

import pytest

from engine.config import Config, ConfigError, config_from_dict, describe_options, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = config_from_dict({}, ["optim.lr=5e-4", "tasks.drloc.enabled=true", "tasks.drloc.mode=cbr",
                                "data.batch_size=256", "optim.betas=[0.9, 0.95]"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 5e-4 and cfg.tasks.drloc.enabled and cfg.tasks.drloc.mode == "cbr"
    assert cfg.data.batch_size == 256 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.epochs == 100  # untouched default


def test_yaml_file_and_override_precedence(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 0.002\n  epochs: 17\nmodel:\n  name: vit_cifar\n")
    cfg = load_config(path, ["optim.epochs=19"])
    assert cfg.optim.lr == 0.002 and cfg.optim.epochs == 19


@pytest.mark.parametrize("tree, overrides, key", [
    ({"optim": {"lrr": 1}}, [], "optim.lrr"),
    ({"optimizer": {}}, [], "optimizer"),
    ({}, ["tasks.drloc.modee=l1"], "tasks.drloc.modee"),
    ({}, ["tasks.drloc.mode=l2"], "tasks.drloc.mode"),
    ({}, ["data.batch_size=12.5"], "data.batch_size"),
    ({}, ["data.batch_size=0"], "data.batch_size"),
    ({}, ["data.flip=yes please"], "data.flip"),
    ({}, ["optim.min_lr=1"], "optim.min_lr"),
    ({}, ["engine.zero_stage=3"], "engine.zero_stage"),
    ({"data": 5}, [], "data"),
    ({}, ["optim.lr"], "optim.lr"),
    ({}, ["optim.lr.x=1"], "optim.lr"),
])
def test_bad_keys_and_values_name_the_key(tree, overrides, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree, overrides)
    assert key in str(err.value)


def test_auto_augment_family_is_a_checked_choice():
    """data.auto_augment_impl: torchvision (the default) or reference; a bad value or RandAugment with the
    references' family (which has none) is refused naming the key."""
    assert config_from_dict({}).data.auto_augment_impl == "torchvision"
    cfg = config_from_dict({}, ["data.auto_augment=svhn", "data.auto_augment_impl=reference"])
    assert (cfg.data.auto_augment, cfg.data.auto_augment_impl) == ("svhn", "reference")
    with pytest.raises(ConfigError, match=r"data\.auto_augment_impl: 'pil' is not one of"):
        config_from_dict({}, ["data.auto_augment_impl=pil"])
    with pytest.raises(ConfigError, match=r"data\.auto_augment_impl: .*no RandAugment"):
        config_from_dict({}, ["data.auto_augment=rand", "data.auto_augment_impl=reference"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("run:\n  seeed: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*run\.seeed"):
        load_config(unknown)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3e-4") == ("a.b", 3e-4)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=foo") == ("a.b", "foo")
    assert parse_override("a.b=") == ("a.b", "")


def test_every_option_is_described_with_its_default():
    rows = {key: default for key, _, default in describe_options()}
    assert rows["optim.lr"] == "0.001"
    assert rows["tasks.drloc.mode"] == "'l1'"
    assert len(rows) > 50


def test_shipped_demo_recipe_loads():
    load_config(REPO / "engine" / "configs" / "demo_digits.yaml")
