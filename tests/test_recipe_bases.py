"""Recipes composed from bases (`bases:` in a recipe YAML): every recipe still resolves to the config it resolved to
before it was rewritten over configs/base/ (tests/fixtures/resolved_recipes.json), the folder stays small, and
the `bases:` mechanics (order, nesting, cycles, missing files, errors naming the right file, CLI overrides)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECORDED = json.loads((ROOT / "tests" / "fixtures" / "resolved_recipes.json").read_text())
RECIPES = sorted(CONFIGS.glob("*.yaml"))
LINES_BEFORE_BASES = 3472          # configs/ when every recipe repeated every key


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out.update(_flat(value, f"{dotted}.") if isinstance(value, dict) else {dotted: value})
    return out


def test_the_recipe_set_is_the_recorded_one():
    assert {p.stem for p in RECIPES} == set(RECORDED)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_resolves_to_its_recorded_config(path):
    now = _flat(json.loads(json.dumps(to_dict(load_config(path)))))      # tuples -> lists, as recorded
    then = _flat(RECORDED[path.stem])
    differing = sorted(k for k in now.keys() | then.keys() if now.get(k, "<absent>") != then.get(k, "<absent>"))
    assert not differing, {k: (then.get(k, "<absent>"), now.get(k, "<absent>")) for k in differing}


def test_recipe_folder_is_under_half_its_former_size():
    lines = sum(len(p.read_text().splitlines()) for p in CONFIGS.rglob("*.yaml"))
    assert lines < LINES_BEFORE_BASES / 2, lines


def test_base_files_are_not_recipes_and_say_what_they_hold():
    bases = sorted((CONFIGS / "base").glob("*.yaml"))
    assert bases and not any(p.parent == CONFIGS for p in bases)
    for p in bases:
        assert p.read_text().startswith("# "), f"{p.name} has no header"


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bases_apply_in_order_and_the_recipe_wins(tmp_path):
    _write(tmp_path, "b/one.yaml", "optim:\n  lr: 1.0e-2\n  epochs: 17\nmodel:\n  drop_path: 0.2\n")
    _write(tmp_path, "b/two.yaml", "optim:\n  lr: 2.0e-2\n")
    recipe = _write(tmp_path, "r.yaml", "bases: [b/one.yaml, b/two.yaml]\nmodel:\n  drop_path: 0.3\n")
    cfg = load_config(recipe)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.model.drop_path) == (2e-2, 17, 0.3)
    assert "bases" not in to_dict(cfg)


def test_nested_bases_resolve_relative_to_the_file_naming_them(tmp_path):
    _write(tmp_path, "b/root.yaml", "tasks:\n  drloc:\n    pairs: 8\n    mode: l1\n")
    _write(tmp_path, "b/mid.yaml", "bases: [root.yaml]\ntasks:\n  drloc:\n    pairs: 16\n")
    recipe = _write(tmp_path, "r.yaml", "bases: [b/mid.yaml]\ntasks:\n  drloc:\n    enabled: true\n")
    drloc = load_config(recipe).tasks.drloc
    assert (drloc.enabled, drloc.pairs, drloc.mode) == (True, 16, "l1")


def test_a_cycle_of_bases_is_an_error_naming_the_files(tmp_path):
    _write(tmp_path, "a.yaml", "bases: [b.yaml]\n")
    _write(tmp_path, "b.yaml", "bases: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: bases form a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_a_missing_base_is_an_error_naming_the_recipe_and_the_base(tmp_path):
    recipe = _write(tmp_path, "r.yaml", "bases: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: base not found: .*nope\.yaml"):
        load_config(recipe)


def test_bases_must_be_a_list_of_paths(tmp_path):
    recipe = _write(tmp_path, "r.yaml", "bases: base.yaml\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: bases: must be a list"):
        load_config(recipe)


def test_an_unknown_key_names_the_file_that_wrote_it(tmp_path):
    _write(tmp_path, "b/base.yaml", "optim:\n  lrr: 1.0\n")
    recipe = _write(tmp_path, "r.yaml", "bases: [b/base.yaml]\noptim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'optim\.lrr'") as err:
        load_config(recipe)
    assert "r.yaml" not in str(err.value)
    _write(tmp_path, "b/base.yaml", "optim:\n  lr: 1.0e-3\n")
    _write(tmp_path, "r.yaml", "bases: [b/base.yaml]\nmodel:\n  nmae: vit_cifar\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key 'model\.nmae'") as err:
        load_config(recipe)
    assert "base.yaml" not in str(err.value)


def test_command_line_overrides_win_over_recipe_and_bases(tmp_path):
    _write(tmp_path, "b/base.yaml", "optim:\n  lr: 1.0e-2\n  epochs: 15\n")
    recipe = _write(tmp_path, "r.yaml", "bases: [b/base.yaml]\noptim:\n  epochs: 16\n")
    cfg = load_config(recipe, ["optim.lr=3e-4", "optim.epochs=19"])
    assert (cfg.optim.lr, cfg.optim.epochs) == (3e-4, 19)
