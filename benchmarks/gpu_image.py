"""The GPU machine's image (``benchmarks/gpu_image.yaml``): check what ``.gpu_site`` carries against it, and
build a CPU emulation of it.

    python benchmarks/gpu_image.py check [--site .gpu_site]     # exit 2 when a requirement does not hold
    python benchmarks/gpu_image.py emulate DEST                 # DEST/site: the image's packages, for python -S

The check reads every distribution in the site (its ``*.dist-info``), evaluates its requirements for the image's
Python on Linux x86_64 (no extras), and holds each against the version the site itself carries or, failing that,
the image's recorded version. A requirement on a package the image has without a recorded version is noted as
unchecked; one on a package neither has is a failure.

The emulation: the image's recorded versions installed with ``pip --no-deps`` where they differ from this
environment (transformers, huggingface_hub, tokenizers), everything else the image has linked from this
environment (the ``emulate_with_local`` ones stand in for CUDA builds: torch 2.13 CPU for torch 2.11), nothing of
``absent``. Run ``python -S`` with ``PYTHONPATH=.gpu_site:DEST/site`` (what the GPU command does, minus CUDA).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

IMAGE_FILE = Path(__file__).with_name("gpu_image.yaml")
# kornia imports kornia_rs at import time; prepare_gpu_site.py ships a stub that satisfies it (augmentation never
# calls it), so its version requirement is not held against the stub's.
STUBS = {"kornia-rs"}


@dataclass
class Image:
    python: str
    versions: dict[str, str]
    present: set[str]
    assumed: set[str]
    absent: set[str]
    emulate_with_local: set[str] = field(default_factory=set)

    def has(self, name: str) -> bool:
        return name in self.versions or name in self.present or name in self.assumed


def load_image(path: Path = IMAGE_FILE) -> Image:
    raw = yaml.safe_load(path.read_text())
    names = lambda key: {canonicalize_name(n) for n in raw.get(key) or []}  # noqa: E731
    return Image(python=str(raw["python"]), versions={canonicalize_name(k): str(v) for k, v in raw["versions"].items()},
                 present=names("present"), assumed=names("assumed"), absent=names("absent"),
                 emulate_with_local=names("emulate_with_local"))


def marker_environment(image: Image) -> dict[str, str]:
    env = default_environment()
    major_minor = ".".join(image.python.split(".")[:2])
    env.update(python_version=major_minor, python_full_version=image.python, sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython", extra="")
    return env


def site_distributions(site: Path) -> dict[str, md.Distribution]:
    """The distributions a site folder carries (by canonical name)."""
    return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}


@dataclass
class CheckResult:
    problems: list[str]
    notes: list[str]


def check_distribution(dist: md.Distribution, image: Image, carried: dict[str, str]) -> CheckResult:
    """Does ``dist`` install on the image, given what the site carries (``carried``: name -> version)?"""
    name, version = dist.metadata["Name"], dist.version
    problems, notes = [], []
    env = marker_environment(image)
    requires_python = dist.metadata.get("Requires-Python")
    if requires_python and not _holds(requires_python, image.python):
        problems.append(f"{name} {version} requires Python {requires_python}; the image has {image.python}")
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in STUBS and dep in carried:
            notes.append(f"{name} {version}: {req} is met by the stub in the site")
            continue
        have = carried.get(dep) or image.versions.get(dep)
        if have is not None:
            if not req.specifier.contains(Version(have), prereleases=True):
                where = "the site carries" if dep in carried else "the image has"
                problems.append(f"{name} {version} requires {req}; {where} {req.name} {have}")
        elif dep in image.present:
            notes.append(f"{name} {version}: {req} unchecked (the image has {req.name}, version not recorded)")
        elif dep in image.assumed:
            notes.append(f"{name} {version}: {req} assumed present on the image (not recorded)")
        else:
            problems.append(f"{name} {version} requires {req}; neither the image nor the site has it")
    return CheckResult(problems, notes)


def _holds(spec: str, version: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec).contains(Version(version), prereleases=True)


def check_site(site: Path, image: Image | None = None) -> CheckResult:
    """Every distribution of ``site`` against the image (and the site's own versions)."""
    image = image or load_image()
    dists = site_distributions(site)
    carried = {n: d.version for n, d in dists.items()}
    problems, notes = [], []
    for _, dist in sorted(dists.items()):
        r = check_distribution(dist, image, carried)
        problems += r.problems
        notes += r.notes
    return CheckResult(problems, notes)


# ---- the CPU emulation ----------------------------------------------------------------------------


def _top_level(dist: md.Distribution) -> set[str]:
    """The first path components a distribution installs into site-packages (packages, modules, dist-info)."""
    out = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(".pth"):
            out.add(parts[0])
    return out


def _closure(roots: set[str], image: Image, local: dict[str, md.Distribution], installed: dict[str, md.Distribution]
             ) -> set[str]:
    """The image's packages and what they require, transitively, resolved in this environment."""
    env = marker_environment(image)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name in image.absent:
            continue
        seen.add(name)
        dist = installed.get(name) or local.get(name)
        if dist is None:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return seen


def emulate(dest: Path, image: Image | None = None, pip: list[str] | None = None) -> dict:
    """Build ``dest/site``: the image's packages at its versions (see the module docstring). Returns what was
    installed, linked, substituted and left out."""
    image = image or load_image()
    site = dest / "site"
    site.mkdir(parents=True, exist_ok=True)
    local = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions()}
    pins = [f"{n}=={v}" for n, v in sorted(image.versions.items())
            if n not in image.emulate_with_local and (n not in local or local[n].version != v)]
    if pins:
        cmd = [*(pip or [sys.executable, "-m", "pip"]), "install", "--quiet", "--no-deps", "--no-compile",
               "--only-binary", ":all:", "--target", str(site), *pins]
        subprocess.run(cmd, check=True)
    installed = site_distributions(site)
    want = _closure(set(image.versions) | image.present | image.assumed, image, local, installed)
    linked, missing = [], []
    for name in sorted(want - set(installed)):
        dist = local.get(name)
        if dist is None:
            missing.append(name)
            continue
        base = Path(dist.locate_file(""))
        for top in _top_level(dist):
            target = site / top
            if not target.exists() and (base / top).exists():
                os.symlink(base / top, target)
        linked.append(f"{name}=={dist.version}")
    substituted = {n: {"image": image.versions[n], "emulated": local[n].version}
                   for n in sorted(image.emulate_with_local) if n in local and n in image.versions}
    report = {"installed": pins, "linked": linked, "missing": missing, "substituted": substituted,
              "python": {"image": image.python, "emulated": ".".join(map(str, sys.version_info[:3]))}}
    (dest / "emulation.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check a prepared site against the image")
    c.add_argument("--site", default=".gpu_site")
    e = sub.add_parser("emulate", help="build the image's packages into DEST/site")
    e.add_argument("dest")
    args = p.parse_args(argv)
    if args.cmd == "check":
        site = Path(args.site)
        if not site.is_dir():
            print(f"gpu_image: {site} does not exist (run benchmarks/prepare_gpu_site.py)", file=sys.stderr)
            return 2
        r = check_site(site)
        for line in r.notes:
            print("note: " + line)
        for line in r.problems:
            print("does not hold on the GPU image: " + line, file=sys.stderr)
        return 2 if r.problems else 0
    print(json.dumps(emulate(Path(args.dest)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
