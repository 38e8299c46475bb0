"""The package boundaries the architecture depends on, checked on the import graph (source, no imports run)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK_MODULES = ("xlsr_jax.tasks.ctc", "xlsr_jax.tasks.classification", "xlsr_jax.tasks.pretraining")
TASK_NAMES = ("ctc", "pretraining", "sequence_classification", "classification")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_data_pipelines_is_a_leaf_package():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] == "xlsr_jax")
                 for p in (ROOT / "data_pipelines").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_train_package_knows_no_task_by_name():
    for path in (ROOT / "xlsr_jax" / "train").glob("*.py"):
        imported = _imports(path)
        assert not any(n.startswith(TASK_MODULES) for n in imported), path.name
        strings = {node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & set(TASK_NAMES), (path.name, strings & set(TASK_NAMES))
