"""The package's imports run one way, down the layers of ``asda_jax.LAYERS``, with no
cycle; and every fact about hardware lives in ``asda_jax/hardware.py``."""

import ast
import json
import re
from pathlib import Path

import pytest

import asda_jax
from asda_jax import hardware
from tests import train_helpers as th

PACKAGE = th.ROOT / "asda_jax"
LAYER_OF = {module: i for i, (_, modules) in enumerate(asda_jax.LAYERS) for module in modules}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``model/encoder.py`` → "model.encoder"; a subpackage's ``__init__.py`` → its name."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> list[str]:
    """Every module of the package; a subpackage's ``__init__`` counts where it imports
    anything of the package (``model``: its public names)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py" or path.parent == PACKAGE / "hf_code":
            continue  # hf_code: files written into Hugging Face folders, not modules of ours
        if path.name == "__init__.py" and not imports_of(module_name(path)):
            continue
        found.append(module_name(path))
    return sorted(found)


def imported_modules(node: ast.AST, known) -> list[str]:
    """The asda_jax modules an import statement names, relative to the package:
    ``from asda_jax.model import config`` names the module model.config, and
    ``from asda_jax import model`` the package model."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
        names = [
            f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[9:] in known else node.module
            for a in node.names
        ]
    else:
        return []
    return [name[9:] for name in names if name.startswith("asda_jax.") and name[9:] in known]


def source_of(module: str, package: Path = PACKAGE) -> Path:
    path = package / (module.replace(".", "/") + ".py")
    return path if path.exists() else package / module.replace(".", "/") / "__init__.py"


def imports_of(module: str, package: Path = PACKAGE) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) of every asda_jax import in ``module``."""
    tree = ast.parse(source_of(module, package).read_text())
    known = set(LAYER_OF) | {module}
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names = imported_modules(child, known)
            found.extend((name, in_function, child.lineno) for name in names if name != module)
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


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a module graph (each once, from its first module found)."""
    found, done = [], set()

    def walk(module, path):
        if module in path:
            found.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            walk(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        walk(module, [])
    return found


def test_no_import_cycle_closes():
    edges = {m: {name for name, _, _ in imports_of(m)} for m in package_modules()}
    assert cycles(edges) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_an_upward_or_local_import_is_caught(tmp_path):
    """The checks above see both kinds of import they forbid."""
    (tmp_path / "sharding.py").write_text(
        "from asda_jax import train_lib\n\ndef f():\n    from asda_jax.data import pipeline\n"
    )
    found = imports_of("sharding", package=tmp_path)
    assert found == [("train_lib", False, 1), ("data.pipeline", True, 4)]


def imported_names(source: str) -> set[str]:
    """Every module a script's source imports, and each name it imports from one
    (IPython's ``%`` and ``!`` lines read as ``pass``)."""
    code = re.sub(r"(?m)^(\s*)[%!].*$", r"\1pass", source)
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def user_facing_sources() -> dict[str, str]:
    """The launchers, configs and the notebook's code: what a user runs from an
    installed package, so they may import from it and no further."""
    sources = {
        str(path.relative_to(th.ROOT)): path.read_text()
        for folder in ("launch", "configs")
        for path in sorted((th.ROOT / folder).glob("*.py"))
    }
    notebook = json.loads((th.ROOT / "notebooks" / "colab_demo.ipynb").read_text())
    sources["notebooks/colab_demo.ipynb"] = "\n".join(
        "".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"
    )
    return sources


def test_what_users_run_imports_the_package_not_the_checkouts_tests_or_benchmarks():
    outside = ("tests", "benchmarks", "asda_jax.testing")
    found = {
        name: sorted(m for m in imported_names(source) if m.split(".")[0] in outside[:2]
                     or m.startswith(outside[2]))
        for name, source in user_facing_sources().items()
    }  # fmt: skip
    assert len(found) > 15 and "notebooks/colab_demo.ipynb" in found
    assert {name: mods for name, mods in found.items() if mods} == {}
    assert imported_names("%pip install x\nfrom benchmarks import hlo") >= {"benchmarks"}


def test_the_readme_draws_the_same_layer_map():
    readme = (th.ROOT / "README.md").read_text()
    lines = [f"{name}: {', '.join(modules)}" for name, modules in reversed(asda_jax.LAYERS)]
    positions = [readme.find(line) for line in lines]
    assert -1 not in positions, [line for line, at in zip(lines, positions, strict=True) if at < 0]
    assert positions == sorted(positions)  # top of the map first, as imports flow


# ---------------------------------------------------------------------------- hardware


def chip_names() -> re.Pattern:
    """Any chip's short name or device kind, as a word (case-insensitive)."""
    names = {c.name for c in hardware.CHIPS.values() if c.device_kinds and c.platform != "cpu"}
    kinds = {k for c in hardware.CHIPS.values() for k in c.device_kinds if k != "cpu"}
    words = sorted(names | kinds | {"megacore", "TensorCore"}, key=len, reverse=True)
    return re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, words)) + r")(?![\w])", re.I)


def chip_figures() -> set[float]:
    """Every published figure of the table (peaks, HBM, bandwidths, VMEM), and the lanes."""
    fields = ("peak_flops", "hbm_bytes", "hbm_bandwidth", "vmem_bytes", "kernel_vmem_bytes")
    figures = {getattr(c, f) for c in hardware.CHIPS.values() for f in fields}
    return {float(x) for x in figures if x} | {float(hardware.LANES)}


def constant_values(tree: ast.AST) -> list[tuple[float, int]]:
    """(value, line) of every number in the source, and of every arithmetic expression of
    numbers only (``16 * 1024**2``), where the number is not a lone small count."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp | ast.Constant):
            try:
                value = eval(compile(ast.Expression(node), "<figure>", "eval"), {})
            except Exception:
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                found.append((float(value), node.lineno))
    return found


FIGURE_NAMES = re.compile(r"\b[A-Z_]*(LANES|VMEM|HBM|PEAK|TFLOPS|BANDWIDTH)[A-Z_]*\s*=")


def hardware_facts_in(source: str, figures: set[float], names: re.Pattern) -> list[str]:
    """Where a module's source names a chip, defines a constant named for a chip's figure,
    or holds a figure of the table (the lane width counts only where it is named so)."""
    found = [f"line {n}: {m.group(0)!r}" for n, m in _matches(names, source)]
    found += [f"line {n}: {m.group(0)!r}" for n, m in _matches(FIGURE_NAMES, source)]
    large = {f for f in figures if f >= 2**20}
    tree = ast.parse(source)
    found += [f"line {line}: {value:g}" for value, line in constant_values(tree) if value in large]
    return found


def _matches(pattern: re.Pattern, source: str):
    for number, line in enumerate(source.splitlines(), 1):
        for match in pattern.finditer(line):
            yield number, match


@pytest.mark.parametrize("module", [m for m in package_modules() if m != "hardware"])
def test_only_the_hardware_module_names_a_chip_or_holds_its_figures(module):
    source = source_of(module).read_text()
    assert hardware_facts_in(source, chip_figures(), chip_names()) == []


def test_the_hardware_check_sees_a_chip_and_its_figures():
    names, figures = chip_names(), chip_figures()
    planted = (
        '"""Fits v5e\'s VMEM."""\n'
        "LIMIT = 16 * 1024**2\n"
        "MY_VMEM_LIMIT = 7\n"
        "peak = 197e12  # TPU v5 lite\n"
        "bins = 128\n"
    )
    found = hardware_facts_in(planted, figures, names)
    assert sorted({f.split(":")[0] for f in found}) == ["line 1", "line 2", "line 3", "line 4"]
    assert hardware_facts_in("mel_bins = 128\nwidth = 768\n", figures, names) == []
