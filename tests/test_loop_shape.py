"""The loop skeleton's shape: the two entry points stay short and are siblings (engine/loop.py holds what they
share), so neither imports the other."""
import ast
import inspect
from pathlib import Path

import engine.pretrain
import engine.train

ENGINE = Path(engine.train.__file__).parent


def _body_lines(function) -> int:
    """Non-blank source lines of `function` after its signature, its docstring left out."""
    tree = ast.parse(inspect.getsource(function).lstrip())
    node = tree.body[0]
    body = node.body[1:] if ast.get_docstring(node) else node.body
    lines = inspect.getsource(function).lstrip().splitlines()[body[0].lineno - 1:body[-1].end_lineno]
    return sum(1 for line in lines if line.strip())


def test_train_and_pretrain_entry_bodies_are_under_80_lines():
    sizes = {f.__qualname__: _body_lines(f) for f in (engine.train._train, engine.pretrain._pretrain)}
    assert all(n < 80 for n in sizes.values()), sizes


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_train_and_pretrain_import_nothing_from_each_other():
    assert not {n for n in _imported_modules(ENGINE / "train.py") if n.startswith("engine.pretrain")}
    assert not {n for n in _imported_modules(ENGINE / "pretrain.py") if n.startswith("engine.train")}
