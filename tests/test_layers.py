"""The house reads downward: no module imports from a layer above its own.

The layer order is written once, in docs/ARCHITECTURE.md (the ```layers block, highest first); this test
parses every import (module level or inside a function) of schemas/, pipeline/, actors/ and jobs/ and fails
on any arrow that points up or sideways into another unit of the same layer, naming the file and line.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "actors", "jobs")


def layers() -> list[list[str]]:
    """The units of each layer, highest first, as docs/ARCHITECTURE.md lists them."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no ```layers block"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def unit_of(module: str) -> str:
    """The unit a module belongs to: a top package, or a sub-package / top module of pipeline/."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" and len(parts) > 1 else parts[0]


def _module_exists(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every project import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline import io` imports pipeline.io
            subs = [f"{node.module}.{a.name}" for a in node.names if _module_exists(f"{node.module}.{a.name}")]
            found += [(node.lineno, m) for m in subs] or [(node.lineno, node.module)]
    return [(line, m) for line, m in found if m.split(".")[0] in PACKAGES]


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def arrows_up() -> list[str]:
    rank = {unit: i for i, layer in enumerate(reversed(layers())) for unit in layer}
    bad = []
    for path in project_files():
        src = unit_of(module_name(path))
        for line, target in imports(path):
            dst = unit_of(target)
            if dst != src and dst != "pipeline" and rank[dst] >= rank[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({src} -> {dst})")
    return bad


def test_every_unit_has_a_layer() -> None:
    listed = [unit for layer in layers() for unit in layer]
    assert len(listed) == len(set(listed)), "a unit is listed twice in docs/ARCHITECTURE.md's layers"
    units = {unit_of(module_name(p)) for p in project_files()} - {"pipeline"}
    missing = sorted(units - set(listed))
    assert not missing, f"give these a layer in docs/ARCHITECTURE.md's ```layers block: {missing}"
    assert not set(listed) - units, f"layers list units that do not exist: {sorted(set(listed) - units)}"


def test_no_import_points_up() -> None:
    bad = arrows_up()
    assert not bad, "imports from a higher layer (or across one layer):\n" + "\n".join(bad)


def test_the_check_sees_an_arrow_up(tmp_path, monkeypatch) -> None:
    """The checker itself: an import hidden in a function of a lower layer is found."""
    fake = tmp_path / "pipeline" / "io"
    fake.mkdir(parents=True)
    (fake / "sneaky.py").write_text("def f():\n    from pipeline.engine.invert import InversionEngine\n")
    monkeypatch.setattr(sys.modules[__name__], "project_files", lambda: [fake / "sneaky.py"])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ARCHITECTURE.md").write_text("```layers\npipeline.engine\npipeline.io\n```\n")
    assert arrows_up() == ["pipeline/io/sneaky.py:2 imports pipeline.engine.invert (pipeline.io -> pipeline.engine)"]
