"""Safety rules checked on the source: no pickle of files, checkpoints only through safe loaders."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ["pipeline", "actors", "jobs", "schemas", "benchmarks", "examples"]


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in sorted((ROOT / pkg).rglob("*.py"))]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def test_torch_load_always_weights_only() -> None:
    found = 0
    for path in _sources():
        for call in _calls(ast.parse(path.read_text())):
            if _name(call.func) == "torch.load":
                found += 1
                kw = {k.arg: k.value for k in call.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, path
    assert found >= 1  # pipeline/checkpoint_io.load_state_dict reads both converters' checkpoints


def test_no_pickle_module_in_project_code() -> None:
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), path


def test_local_ray_dashboard_binds_to_loopback() -> None:
    tree = ast.parse((ROOT / "jobs" / "synthesize.py").read_text())
    inits = [c for c in _calls(tree) if _name(c.func) == "ray.init"]
    local = [c for c in inits if any(k.arg == "include_dashboard" for k in c.keywords)]
    assert local, "the local ray.init call"
    for call in local:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("dashboard_host"), ast.Constant) and kw["dashboard_host"].value == "127.0.0.1"
