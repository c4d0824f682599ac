"""The README's recipe table is a claim about every file in configs/: each row's weight-decay convention, AutoAugment
family, precision and selection rule must be what its recipes set, and every recipe must have exactly one row."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### Recipes (`configs/`): what each takes from its reference"


def table_rows() -> list[list[str]]:
    """The rows (cells, stripped) of the first table under HEADING, header and rule excluded."""
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n### ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert len(lines) > 2, "the recipe table is missing"
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def family_patterns(cell: str) -> tuple[list[str], list[str]]:
    """'`vit_scratch`, `swin_*`' -> regexes over a recipe's stem; '`ssl_*` (but `x`)' also gives exclusions."""
    head, _, but = cell.partition("(but")
    to_re = lambda name: name.replace("*", ".*")   # noqa: E731
    names = [to_re(n) for n in re.findall(r"`([^`]+)`", head)]
    return names, [to_re(n) for n in re.findall(r"`([^`]+)`", but)]


def row_of(stem: str, rows: list[list[str]]) -> list[list[str]]:
    hits = []
    for row in rows:
        names, excluded = family_patterns(row[0])
        if any(re.fullmatch(x, stem) for x in excluded):
            continue
        # a training recipe is <dataset>_<family>; ssl recipes are named whole
        if any(re.fullmatch(n, stem) or re.fullmatch(r"[a-z0-9]+_" + n, stem) for n in names):
            hits.append(row)
    return hits


def code(cell: str) -> str:
    """The value a cell claims: its first `code` span, or its first word."""
    found = re.search(r"`([^`]+)`", cell)
    return found.group(1) if found else cell.split()[0]


RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_table_has_rows_and_the_columns_it_is_read_by():
    header = (ROOT / "README.md").read_text().split(HEADING, 1)[1].split("\n### ", 1)[0]
    assert "`optim.no_decay`" in header and "`data.auto_augment_impl`" in header
    assert "`engine.precision`" in header and "selection" in header
    assert len(table_rows()) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_is_what_its_readme_row_says(path):
    rows = row_of(path.stem, table_rows())
    assert len(rows) == 1, f"{path.name}: {len(rows)} rows of the README recipe table match it (want exactly one)"
    family, reference, decay, augment, precision, selection, deviations = rows[0]
    cfg = load_config(path)
    assert cfg.optim.no_decay == code(decay), f"{path.name}: optim.no_decay {cfg.optim.no_decay}, README {decay}"
    if augment.startswith("none"):
        assert cfg.data.auto_augment == "none", f"{path.name}: AutoAugment on, README says none"
    else:
        assert cfg.data.auto_augment != "none", f"{path.name}: no AutoAugment, README says {augment}"
        assert cfg.data.auto_augment_impl == code(augment), f"{path.name}: {cfg.data.auto_augment_impl} vs {augment}"
    assert cfg.engine.precision == code(precision), f"{path.name}: precision {cfg.engine.precision}, README {precision}"
    if selection == "test" or selection.startswith("k-NN"):
        assert cfg.data.val_fraction == 0.0, f"{path.name}: data.val_fraction set, README says {selection}"
    else:
        assert cfg.data.val_fraction > 0.0, f"{path.name}: README says {selection} but no data.val_fraction"
    if cfg.engine.precision == "bf16":
        assert "bf16" in deviations, f"{path.name}: bf16 autocast is a deviation from the fp32 references: name it"
    assert path.stem.startswith("ssl_") == selection.startswith("k-NN"), f"{path.name}: selection {selection}"
