"""The experiment presets equal the recipe tables in experiments/README.md, row by row.

Each table row is a config key and one Python literal per preset column (`-`: the preset has no such
key); `arch.<field>` rows are the architecture preset's fields. A recipe key in a preset that no row
lists fails too, so the table cannot silently fall behind the code.
"""

import ast
import pathlib
import re

import pytest

from xlsr_jax.config import get_preset
from xlsr_jax.experiment import load_experiment

README = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "README.md"
FILES = {"pretrain": "experiments/pretrain_xlsr.py", "ctc": "experiments/finetune_ctc.py",
         "lid": "experiments/finetune_lid.py"}
# Keys that choose hardware behaviour or paths, not the recipe.
NOT_RECIPE = {
    "model.overrides.dtype", "model.overrides.remat_policy", "model.overrides.scan_layers", "model.init_from",
    "data.dir", "data.train_split", "data.eval_split", "data.worker_count", "data.seed", "data.vocab",
    "data.lowercase",
}
SECTIONS = ("model.overrides", "data", "optim", "objective")
TRAIN_RECIPE_KEYS = ("train.accum_steps", "train.steps")


def _tables():
    """{(experiment, preset): {key: literal or None}} from every recipe table in the README."""
    out = {}
    columns = None
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if not cells:
            columns = None
            continue
        if cells[0] == "key":
            columns = cells[1:-1]
            continue
        if columns is None or set(cells[0]) <= {"-"}:
            continue
        key = cells[0].strip("`")
        for column, cell in zip(columns, cells[1 : 1 + len(columns)]):
            experiment, preset = column.split(":") if ":" in column else ("pretrain", column)
            value = None if cell == "-" else ast.literal_eval(cell.strip("`"))
            out.setdefault((experiment, preset), {})[key] = value
    return out


TABLES = _tables()


def _recipe_keys(config) -> set[str]:
    keys = set()
    for section in SECTIONS:
        node = config
        for part in section.split("."):
            node = node[part]
        keys |= {f"{section}.{k}" for k in node.keys()}
    keys |= {k for k in TRAIN_RECIPE_KEYS}
    return keys - NOT_RECIPE


def _lookup(config, key):
    if key.startswith("arch."):
        return getattr(get_preset(config.model.preset), key.split(".", 1)[1])
    node = config
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def test_the_tables_cover_every_recipe_and_preset():
    assert set(TABLES) == {("pretrain", p) for p in ("base", "large", "xlsr_300m", "xlsr_1b", "xlsr_2b")} | {
        ("ctc", "xlsr_300m"), ("ctc", "xlsr_1b"), ("ctc", "xlsr_2b"), ("lid", "xlsr_300m")}
    assert len(TABLES[("pretrain", "base")]) >= 50


@pytest.mark.parametrize("experiment,preset", sorted(TABLES), ids=[f"{e}:{p}" for e, p in sorted(TABLES)])
def test_preset_equals_its_recipe_column(experiment, preset):
    config = load_experiment(f"{FILES[experiment]}:{preset}", [])
    table = TABLES[(experiment, preset)]
    wrong = {key: (_lookup(config, key), want) for key, want in table.items() if _lookup(config, key) != want}
    assert not wrong, f"preset differs from experiments/README.md (ours, table): {wrong}"
    unlisted = sorted(k for k in _recipe_keys(config) if k not in table)
    assert not unlisted, f"recipe keys with no row in experiments/README.md: {unlisted}"


def test_a_changed_value_is_caught():
    """The comparison is real: a preset with one value off fails it."""
    config = load_experiment(f"{FILES['pretrain']}:large", ["--config.optim.peak_lr=0.0003"])
    assert _lookup(config, "optim.peak_lr") != TABLES[("pretrain", "large")]["optim.peak_lr"]
    assert re.search(r"\| `optim.peak_lr` \|", README.read_text())
