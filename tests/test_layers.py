"""The package's imports run one way: down the layers of ``asda_jax.LAYERS``."""

import ast
from pathlib import Path

import pytest

import asda_jax
from tests import train_helpers as th

PACKAGE = th.ROOT / "asda_jax"
LAYER_OF = {module: i for i, (_, modules) in enumerate(asda_jax.LAYERS) for module in modules}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def package_modules() -> list[str]:
    return sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def imported_modules(node: ast.AST) -> list[str]:
    """The asda_jax modules an import statement names, relative to the package."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return []
    found = []
    for name in names:
        parts = name.split(".")
        if parts[0] == "asda_jax" and ".".join(parts[1:]) in LAYER_OF:
            found.append(".".join(parts[1:]))
    return found


def imports_of(module: str, package: Path = PACKAGE) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) of every asda_jax import in ``module``."""
    tree = ast.parse((package / (module.replace(".", "/") + ".py")).read_text())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            found.extend((name, in_function, child.lineno) for name in imported_modules(child))
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_module_has_exactly_one_layer():
    listed = [m for _, modules in asda_jax.LAYERS for m in modules]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == package_modules()


@pytest.mark.parametrize("module", package_modules())
def test_imports_run_down_the_layers(module):
    upward = [
        f"line {line}: {name} (layer {LAYER_OF[name]})"
        for name, _, line in imports_of(module)
        if LAYER_OF[name] > LAYER_OF[module]
    ]
    assert not upward, f"{module} (layer {LAYER_OF[module]}) imports from above: {upward}"
    local = [
        f"line {line}: {name}" for name, in_function, line in imports_of(module) if in_function
    ]
    assert not local, f"{module} imports package modules inside functions: {local}"


def test_an_upward_or_local_import_is_caught(tmp_path):
    """The checks above see both kinds of import they forbid."""
    (tmp_path / "sharding.py").write_text(
        "from asda_jax import train_lib\n\ndef f():\n    from asda_jax.data import pipeline\n"
    )
    found = imports_of("sharding", package=tmp_path)
    assert found == [("train_lib", False, 1), ("data.pipeline", True, 4)]


def test_the_readme_draws_the_same_layer_map():
    readme = (th.ROOT / "README.md").read_text()
    lines = [f"{name}: {', '.join(modules)}" for name, modules in reversed(asda_jax.LAYERS)]
    positions = [readme.find(line) for line in lines]
    assert -1 not in positions, [line for line, at in zip(lines, positions, strict=True) if at < 0]
    assert positions == sorted(positions)  # top of the map first, as imports flow
