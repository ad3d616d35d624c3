"""The package's layers import one way only (DESIGN.md, "Engine v2"): every import, also inside a
function, goes to the same layer or one below. The facade ``stepcache`` (the package itself) is for
users and the CLI only."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "stepcache"
RANK = {"_version": 0, "errors": 0, "assets": 0, "core": 1, "io": 1, "downloads": 1, "models": 2, "diffusion": 2,
        "policies": 2, "policy_file": 2, "adapters": 3, "api": 4, "compilation": 4, "sampling": 5, "eval": 5,
        "training": 6, "bench": 7, "tune": 7, "cli": 9,
        "__main__": 9, "": 10}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports():
    for path in ROOT.rglob("*.py"):
        module = ".".join(("stepcache",) + path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stepcache":
                yield module, node.module
            elif isinstance(node, ast.Import):
                yield from ((module, a.name) for a in node.names if a.name.split(".")[0] == "stepcache")


def test_every_layer_is_known():
    layers = {_layer(m) for pair in _imports() for m in pair}
    assert layers <= set(RANK), layers - set(RANK)


def test_no_upward_import():
    upward = sorted({(a, b) for a, b in _imports() if RANK[_layer(b)] > RANK[_layer(a)]
                     and not (_layer(a) == "cli" and b == "stepcache")})
    assert not upward, upward


def test_core_imports_only_core_and_errors():
    assert {b for a, b in _imports() if _layer(a) == "core" and _layer(b) not in ("core", "errors")} == set()
