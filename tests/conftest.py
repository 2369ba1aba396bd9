"""Shared fixtures: the tiny model set in a per-session cache, loaded once; no network."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.io.compbench_data import COMPBENCH_DIR

# Tests never touch the hub; set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
COMPBENCH = COMPBENCH_DIR  # the repository's own copy (data/t2i-compbench)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for the tiny set, exported so subprocesses (jobs, Ray workers) share it."""
    path = tmp_path_factory.mktemp("tiny-cache")
    os.environ["REFEREE_SYNTH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def shared_ray(tiny_cache: Path):
    """Environment entries that point a job at a Ray head shared by the tests (``RAY_ADDRESS`` and the auth token).

    Starting a local Ray costs each job run about 8 s; most job tests connect to this head instead, exactly as a job
    does inside ``ray job submit`` on a cluster, with token authentication on as on a real cluster. One per pytest
    process (defined here, not in a test module: a module importing it would start a second head). It has no
    dashboard (up for the whole suite, one costs ~3% of a core); `ray job submit` and the dashboard address are
    tested on heads of their own."""
    from tests.jobs.ray_head import start_token_head, stop_head

    try:
        head, auth = start_token_head(tiny_cache, dashboard=False)
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield {**auth, "RAY_ADDRESS": head.address}
    finally:
        stop_head(head)  # this head only: other Ray clusters on the machine are left alone


@pytest.fixture(scope="session")
def tiny_cfg(tiny_cache: Path):
    from pipeline.config_loading import load_config, preset_path

    return load_config(preset_path("tiny"), [f"models.tiny_cache_dir={tiny_cache}"])


@pytest.fixture(scope="session")
def generator_models(tiny_cfg):
    from pipeline.models.loading import load_generator_models

    return load_generator_models(tiny_cfg)


@pytest.fixture(scope="session")
def vqa_models(tiny_cfg):
    from pipeline.models.loading import load_vqa_models

    return load_vqa_models(tiny_cfg)


def compbench_prompts(name: str, limit: int | None = None) -> list[str]:
    """Prompts from a shipped T2I-CompBench list, e.g. ``color_val``."""
    lines = (COMPBENCH / f"{name}.txt").read_text().splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    return prompts[:limit] if limit else prompts


def project_files() -> list[str]:
    """What a clone of the working tree holds: tracked files plus new, not ignored ones."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def copy_project(dest: Path) -> Path:
    """The project's files in ``dest`` (a stand-in for ``git clone``), nothing beside them."""
    for name in project_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup` (`make test`): tests that share a module- or class-scoped fixture
    (a tiny run, a server) stay on one worker, so it is made once; every other test goes to any free worker."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else []
        if any(d.scope in ("module", "class", "package") for chain in defs for d in chain):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def pytest_configure(config: pytest.Config) -> None:
    """Refuse `--dist loadgroup` where the groups cannot reach the scheduler: pytest-xdist (3.8 and older) names a
    test's group by rewriting its node id, which pytest 9.2 ignores (pytest-xdist issue 1386). Every worker would
    then build every module fixture (a tiny run each), silently: the nightly scenario's five job runs twice."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version

    if version("pytest").startswith("9.2.") and tuple(map(int, version("pytest-xdist").split(".")[:2])) <= (3, 8):
        raise pytest.UsageError(
            f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} drops --dist loadgroup's "
            "groups: install the versions in requirements-lock.txt (make setup)")
