"""Every command the docs mark as runnable runs, as printed, from a clone into an empty folder.

A fenced ```sh block right after a `<!-- runnable ... -->` line (README.md first, then docs/*.md, then
benchmarks/README.md) is run verbatim, all blocks in that order in one shell (later docs may use the README's
tiny run, `demo-out/readme/run`), on the tiny models with the embedded local Ray.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_project

pytestmark = pytest.mark.slow
RUNNABLE = re.compile(r"^<!-- runnable[^>]*-->\n+```sh\n(.*?)^```", re.M | re.S)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md"]


def runnable_blocks(root: Path = ROOT) -> list[tuple[str, str]]:
    """(document, block) of every runnable block, in run order."""
    return [(str(doc.relative_to(root)), m.group(1)) for doc in documents(root)
            for m in RUNNABLE.finditer(doc.read_text())]


def test_every_runnable_mark_has_its_block() -> None:
    for doc in documents():
        text = doc.read_text()
        assert text.count("<!-- runnable") == len(RUNNABLE.findall(text)), (
            f"{doc.relative_to(ROOT)}: a `<!-- runnable -->` line not followed by a ```sh block")
    docs = {doc for doc, _ in runnable_blocks()}
    assert {"README.md", "docs/CONFIGURATION.md", "docs/EVALUATION.md"} <= docs


def test_the_runnable_commands_run_from_a_lone_clone(tmp_path: Path, tiny_cache: Path) -> None:
    repo = copy_project(tmp_path / "x" / "repo")
    blocks = runnable_blocks(repo)
    script = ["set -euo pipefail"]
    for i, (doc, block) in enumerate(blocks):
        script += [f"echo '>>> block {i} ({doc})'", block]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=path, PYTHONPATH=str(repo), REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp_path / "home"))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for i, (doc, _) in enumerate(blocks):
        assert f">>> block {i} ({doc})" in proc.stdout
    # The README's job really ran: 4 prompts x 1 sample, every shard complete.
    summary = json.loads((repo / "demo-out" / "readme" / "run" / "summary.json").read_text())
    assert summary["samples"] == 4 and summary["shards_completed"] == summary["shards_total"] >= 1
    assert (repo / "demo-out" / "readme" / "plan" / "plan.json").is_file()
    assert (repo / "demo-out" / "readme" / "run" / "report" / "index.html").is_file()


def test_nothing_is_said_twice_across_the_docs() -> None:
    """No sentence (of some length) stands in two of README.md, docs/*.md and benchmarks/README.md: each fact has
    one home, and the others link to it."""
    homes: dict[str, set[str]] = {}
    for doc in documents():
        text = re.sub(r"\s+", " ", doc.read_text())
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if len(sentence.strip()) > 60:
                homes.setdefault(sentence.strip(), set()).add(str(doc.relative_to(ROOT)))
    twice = {s[:120]: sorted(docs) for s, docs in homes.items() if len(docs) > 1}
    assert not twice, twice
