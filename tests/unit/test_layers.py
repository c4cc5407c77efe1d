"""The layering rules (README, "Architecture"), read from the code's own imports.

Every ``import``/``from ... import`` of every product module, at any depth (imports
inside functions included), and every ``importlib.import_module("literal")``, must name
a layer its own layer may use. A violation names the file, the line and the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: layer -> the module prefixes that belong to it (most specific first wins)
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("headrace.core",),
    "api": ("headrace.api",),
    "defs": ("feature_defs",),
    "model": ("headrace.model",),
    "rollout": ("headrace.rollout",),
    "monitor": ("headrace.monitor",),
    "pipeline": ("headrace.pipeline",),
    "streams": ("streams",),
    "offline": ("offline",),
    "serving": ("serving",),
    "roof": ("headrace.cli", "headrace.commands", "headrace.stack", "headrace.demo",
             "headrace.examples", "headrace.simulate"),
    "package": ("headrace",),  # headrace/__init__.py: the version, nothing else
    "bench": ("bench",),
    "tests": ("tests",),
}

#: layer -> the layers its modules may import (besides itself)
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "api": frozenset(),
    "package": frozenset(),
    "defs": frozenset({"core"}),
    "model": frozenset({"core"}),
    # the rollout's shared formats and pure decisions: serving and the roof use them
    "rollout": frozenset({"core", "model"}),
    "streams": frozenset({"core", "defs"}),
    # drift statistics and the model's reference profile: training writes it, the monitor
    # and the roof read it; serving must not import it
    "monitor": frozenset({"core", "defs", "model", "rollout"}),
    "offline": frozenset({"core", "defs", "model", "monitor"}),
    "serving": frozenset({"core", "api", "defs", "model", "rollout"}),
    # the end-to-end pipeline: offline training and the monitor, run from the roof
    "pipeline": frozenset({"core", "defs", "model", "rollout", "offline", "monitor"}),
    "roof": frozenset({"core", "api", "defs", "model", "rollout", "streams", "offline",
                       "serving", "monitor", "pipeline", "package"}),
    # benchmarks run the product on a local stack; nothing imports them
    "bench": frozenset({"core", "api", "defs", "model", "rollout", "streams", "offline",
                        "serving", "monitor", "pipeline", "roof", "package"}),
}

#: the one deliberate dynamic import of a higher layer: ``headrace bench NAME`` loads the
#: benchmark by name from a source checkout (bench/ is not in the wheel)
DYNAMIC_ALLOWED = {("headrace/commands/bench.py", "bench")}

PRODUCT_DIRS = ("headrace", "feature_defs", "streams", "offline", "serving", "bench")


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name, or None when it is not ours."""
    best: tuple[int, str] | None = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), layer)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, dynamic?) of every import in ``source``."""
    out: list[tuple[int, str, bool]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name, False))
            # ``from headrace import cli`` names a submodule
            out += [(node.lineno, f"{name}.{alias.name}", False) for alias in node.names
                    if layer_of(f"{name}.{alias.name}") not in (None, layer_of(name))]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value, True))
    return out


def violations(path: Path, source: str) -> list[str]:
    module = module_name(path)
    own = layer_of(module)
    assert own is not None, f"{path} is in no layer"
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for line, name, dynamic in imported_modules(source, module, path.name == "__init__.py"):
        target = layer_of(name)
        if target is None or target == own or target == "package":
            continue  # headrace/__init__.py holds the version and imports nothing
        if dynamic and (rel, target) in DYNAMIC_ALLOWED:
            continue
        if target not in MAY_IMPORT.get(own, frozenset()):
            found.append(f"{rel}:{line}: {own} imports {name} ({target})")
    return found


def product_files() -> list[Path]:
    files = []
    for top in PRODUCT_DIRS:
        files += [p for p in sorted((ROOT / top).rglob("*.py")) if "_pb2" not in p.name]
    return files


def test_every_import_runs_down_the_layers() -> None:
    problems = [v for path in product_files() for v in violations(path, path.read_text())]
    assert not problems, "imports against the layering rules:\n" + "\n".join(problems)


def test_every_module_is_in_a_layer() -> None:
    assert all(layer_of(module_name(p)) is not None for p in product_files())
    assert layer_of("headrace.core.errors") == "core"
    assert layer_of("headrace.commands.get") == "roof"
    assert layer_of("headrace") == "package"
    assert layer_of("redis") is None


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("serving/x.py", "from offline.store import OfflineStore\n", "serving imports offline"),
        ("serving/x.py", "def f():\n    import streams.engine\n", "serving imports streams"),
        ("offline/x.py", "from serving import reader\n", "offline imports serving"),
        ("headrace/core/x.py", "from feature_defs.model import AggOp\n", "core imports"),
        ("feature_defs/x.py", "from headrace.commands import get\n", "defs imports"),
        ("streams/x.py", "from headrace import demo\n", "streams imports headrace.demo"),
        ("offline/x.py", "import importlib\nimportlib.import_module('bench.stream')\n",
         "offline imports bench"),
        ("headrace/model/x.py", "from ..stack import local\n", "model imports headrace.stack"),
        ("bench/x.py", "from tests.oracle import oracle\n", "bench imports tests"),
        ("serving/x.py", "from headrace.monitor.stats import psi\n",
         "serving imports headrace.monitor"),
        ("headrace/monitor/x.py", "from offline.train import train\n", "monitor imports offline"),
        ("headrace/monitor/x.py", "import serving.scoring\n", "monitor imports serving"),
        ("headrace/pipeline/x.py", "from headrace.commands import get\n", "pipeline imports"),
    ],
)
def test_the_checker_catches(path: str, source: str, expected: str) -> None:
    found = violations(ROOT / path, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_downward_imports() -> None:
    assert violations(ROOT / "serving/x.py", "from headrace.model.artifact import load_model\n"
                      "from headrace.api.v1 import features_pb2\nfrom . import reader\n") == []
    assert violations(ROOT / "offline/x.py",
                      "from headrace.monitor.profile import save_profile\n") == []
    assert violations(ROOT / "headrace/pipeline/x.py", "from headrace.monitor import stats\n"
                      "from offline import train\n") == []
    assert violations(ROOT / "headrace/commands/bench.py",
                      "import importlib\nimportlib.import_module('bench.lookup')\n") == []
