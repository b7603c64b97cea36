"""The layering of src/fleetlm, read from the source with ``ast`` (nothing is imported).

- no import cycle between modules (a package's ``__init__`` counts as a module);
- the lower floors do not reach up: models -> engine, adapters -> engine, server -> tune;
- ``state/`` (keys, tenants, audit, the ledger's table) is a floor below everything but
  config, errors and paths: it imports nothing else of fleetlm;
- only ``cli/`` and ``bench/`` import ``bench/``;
- no function longer than 120 lines; the CLI holds wiring, not domain logic;
- every module opens with a docstring; no module in server/ imports another's private names.

The checks are tested on small hand-made trees too, so a broken walker cannot pass them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 120
# (importer package, imported package): the lower floor must not know the upper one
FORBIDDEN = {("models", "engine"), ("adapters", "engine"), ("server", "tune"),
             ("models", "server"), ("engine", "server"), ("adapters", "server"),
             ("router", "server"), ("privacy", "server"), ("tune", "server")}
BENCH_IMPORTERS = {"cli", "bench"}
# importer package -> the only layers of fleetlm it may import (a lower floor's whitelist)
ONLY = {"state": {"state", "config", "errors", "paths"}}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (``root`` holds packages)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(module imported, line) for each import of a module in ``known``; ``from pkg import
    mod`` counts as importing ``pkg.mod`` when that is a module, else ``pkg``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in known:
                    yield f"{target}.{a.name}", node.lineno
                elif target in known:
                    yield target, node.lineno


def graph(root: Path) -> dict[str, dict[str, int]]:
    known = modules(root)
    return {name: dict(imports(name, p, known)) for name, p in known.items()}


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in g:
        if start in index:
            continue
        work = [(start, iter(g[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(g.get(w, ()))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def layer(module: str) -> str:
    """``fleetlm.server.app`` -> ``server``; a top-level module is its own layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def forbidden_imports(g: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for a, targets in g.items():
        for b, line in targets.items():
            la, lb = layer(a), layer(b)
            if ((la, lb) in FORBIDDEN or (lb == "bench" and la not in BENCH_IMPORTERS)
                    or (la in ONLY and lb not in ONLY[la] and b != "fleetlm")):
                bad.append(f"{a}:{line} imports {b} ({la} -> {lb})")
    return sorted(bad)


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for name, p in modules(root).items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    out.append(f"{name}.{node.name} ({p.name}:{node.lineno}): {n} lines")
    return sorted(out)


def private_cross_imports(root: Path, package: str) -> list[str]:
    """``from <package>.x import _name`` inside ``package`` (a sibling's private name)."""
    known = modules(root)
    out = []
    for name, p in known.items():
        if not name.startswith(package + ".") and name != package:
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package):
                out += [f"{name}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_")]
    return sorted(out)


# -- the walker itself, on hand-made trees ------------------------------------------------


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp / "fleetlm" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp


def test_walker_finds_a_cycle_through_relative_and_package_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "a/__init__.py": "from fleetlm.a.x import f\n",
        "a/x.py": "from ..b import y\n",
        "b/__init__.py": "",
        "b/y.py": "import fleetlm.a\n",
        "c.py": "from fleetlm import a\n",
    })
    found = cycles(graph(root))
    assert found == [["fleetlm.a", "fleetlm.a.x", "fleetlm.b.y"]]


def test_walker_reports_forbidden_imports_with_their_line(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/llama.py": '"""d"""\n\nfrom fleetlm.engine.kv import KV\n',
        "engine/__init__.py": "",
        "engine/kv.py": "KV = 1\n",
        "bench/__init__.py": "",
        "bench/route.py": "def f(): pass\n",
        "router/__init__.py": "",
        "router/train.py": "def g():\n    from fleetlm.bench.route import f\n",
        "cli/__init__.py": "from fleetlm.bench import route\n",
        "errors.py": "class E(Exception): pass\n",
        "state/__init__.py": "",
        "state/keys.py": "from fleetlm.errors import E\nfrom fleetlm.router import train\n",
    })
    assert forbidden_imports(graph(root)) == [
        "fleetlm.models.llama:3 imports fleetlm.engine.kv (models -> engine)",
        "fleetlm.router.train:2 imports fleetlm.bench.route (router -> bench)",
        "fleetlm.state.keys:2 imports fleetlm.router.train (state -> router)",
    ]


def test_walker_measures_functions_including_nested_ones(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(120))
    root = _tree(tmp_path, {"__init__.py": "", "m.py": f"def long():\n{body}\n"
                            f"def short():\n    def inner():\n        pass\n"})
    assert long_functions(root) == ["fleetlm.m.long (m.py:1): 121 lines"]
    assert long_functions(root, limit=121) == []


# -- the real tree ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_graph() -> dict[str, dict[str, int]]:
    return graph(SRC)


def test_the_walker_sees_the_real_tree(real_graph: dict[str, dict[str, int]]) -> None:
    # if the walker silently found nothing, every check below would pass
    assert "fleetlm.server.app" in real_graph and "fleetlm.engine.engine" in real_graph
    assert "fleetlm.engine.engine" in real_graph["fleetlm.server.app"] or any(
        layer(b) == "engine" for b in real_graph["fleetlm.server.local"])
    assert sum(len(v) for v in real_graph.values()) > 100


def test_no_import_cycles(real_graph: dict[str, dict[str, int]]) -> None:
    assert cycles(real_graph) == []


def test_lower_floors_do_not_import_upper_ones(real_graph: dict[str, dict[str, int]]) -> None:
    assert forbidden_imports(real_graph) == []


def test_the_state_store_is_a_lower_floor(real_graph: dict[str, dict[str, int]]) -> None:
    state = {m: t for m, t in real_graph.items() if layer(m) == "state"}
    assert "fleetlm.state.db" in state and "fleetlm.state.keys" in state  # the walker sees it
    used = {layer(b) for targets in state.values() for b in targets}
    assert used <= ONLY["state"], used


def test_no_function_longer_than_120_lines() -> None:
    assert long_functions(SRC) == []


def test_server_modules_import_no_private_names() -> None:
    assert private_cross_imports(SRC, "fleetlm.server") == []


def test_every_module_opens_with_a_docstring() -> None:
    missing = [name for name, p in modules(SRC).items()
               if p.read_text(encoding="utf-8").strip()
               and ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) is None]
    assert missing == []


def test_cli_is_wiring_only() -> None:
    """The CLI's modules define commands and their options; the logic they call lives in the
    domain packages: no module-level helper longer than a screen, no class but option enums."""
    cli = SRC / "fleetlm" / "cli"
    assert cli.is_dir(), "the CLI is the package fleetlm/cli/"
    for p in sorted(cli.glob("*.py")):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert bases <= {"StrEnum", "str, Enum"}, f"{p.name}: class {node.name}"
            if isinstance(node, ast.FunctionDef) and not node.decorator_list:
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                assert n <= 30, f"{p.name}: helper {node.name} is {n} lines (domain logic?)"
