"""Copy the pure-Python packages benchmarks/gpu.py needs into a folder to carry to the GPU machine.

    python benchmarks/prepare_gpu_site.py [--dest .gpu_site] [--no-transformers] [--image benchmarks/gpu_image.yaml]

The GPU image (``benchmarks/gpu_image.yaml``: Python 3.12, torch 2.11 with CUDA, transformers 5.17,
huggingface_hub 1.33, tokenizers, safetensors) lacks diffusers and kornia, and has an older transformers
than the one this project is checked with. The versions copied are the lock's (requirements-lock.txt):
from this environment where it has them, otherwise installed from the registry (``pip --no-deps``) into a
temporary folder first. Then every copied package's requirements are checked against the image's recorded
versions (``benchmarks/gpu_image.py``); when one does not hold (say transformers 5.25, which needs
huggingface_hub >= 2.4, against the image's 1.33) the folder is removed and the exit code is 2, so a site that
would die on import never travels. Copied, with their ``.dist-info`` (the check reads it there too):

- diffusers without its ``pipelines`` sub-packages (only the models and schedulers are used),
- kornia, with a stub ``kornia_rs`` (kornia imports its Rust image I/O at import time; the
  compiled module here is built for this Python, and augmentation never calls it),
- transformers with only the model families used: auto, bert, blip, blip_2, clip; opt (BLIP-2's
  default text config); encoder_decoder and the first families AutoTokenizer finds BERT's and
  CLIP's tokenizers under (it imports them to look the classes up); and those diffusers imports
  when it loads (dinov2, dinov2_with_registers, siglip, vit, vit_mae). ``--no-transformers``
  keeps the GPU image's own.

No byte code. Then on the GPU machine (``.gpu_site`` is git-ignored via
.git/info/exclude and named in the run's ``carry``):

    PYTHONPATH=.gpu_site python3 benchmarks/gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_image import IMAGE_FILE, check_site, load_image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"
# The model families used here (owlv2: the zoo's detector), those diffusers imports at import time
# (autoencoder_rae, ip_adapter), and bloom: the image has peft, which diffusers.loaders.peft imports and which
# imports BloomPreTrainedModel (the CPU emulation of the image found it: tests/benchmarks/test_gpu_image.py).
KEEP_TRANSFORMERS_MODELS = {
    "auto", "bert", "blip", "blip_2", "clip", "opt", "encoder_decoder",
    "dinov2", "dinov2_with_registers", "siglip", "vit", "vit_mae", "bloom", "owlv2",
}
KORNIA_RS_STUB = '''"""Stub of kornia_rs for benchmarks/gpu.py: kornia imports it, augmentation never calls it."""


class _Missing:
    def __getattr__(self, name):
        raise ImportError(f"kornia_rs.io.{name} is a stub on this machine (benchmarks/prepare_gpu_site.py)")


io = _Missing()
__version__ = "0.0.0-stub"
'''
KORNIA_RS_STUB_METADATA = "Metadata-Version: 2.1\nName: kornia-rs\nVersion: 0.0.0+stub\n"


def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    """name -> version of the lock's ``name==version`` lines (canonical names)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    return pins


def source_of(name: str, version: str, scratch: Path) -> md.Distribution:
    """The distribution ``name==version``: this environment's when it is that version, else installed from the
    registry (no dependencies) into ``scratch``."""
    try:
        dist = md.distribution(name)
        if dist.version == version:
            return dist
    except md.PackageNotFoundError:
        pass
    target = scratch / name
    print(f"{name}: this environment has no {version}; installing it from the registry (--no-deps)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--only-binary", ":all:", "--target", str(target), f"{name}=={version}"], check=True)
    return next(d for d in md.distributions(path=[str(target)]) if d.metadata["Name"].lower() == name.lower())


def _package_dir(dist: md.Distribution, package: str) -> Path:
    return Path(dist.locate_file(package))


def _ignore(src: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}


def copy_dist_info(dist: md.Distribution, dest: Path) -> None:
    """The distribution's metadata (the version and requirements the image check and importlib read)."""
    info = Path(dist._path)  # type: ignore[attr-defined]  # PathDistribution: its .dist-info folder
    shutil.copytree(info, dest / info.name, ignore=lambda f, n: {x for x in n if x in ("RECORD", "INSTALLER")})


def copy_diffusers(dist: md.Distribution, dest: Path) -> None:
    src = _package_dir(dist, "diffusers")

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = _ignore(folder, names)
        if Path(folder) == src / "pipelines":
            skip |= {n for n in names if (Path(folder) / n).is_dir()}
        return skip

    shutil.copytree(src, dest / "diffusers", ignore=ignore)
    copy_dist_info(dist, dest)


def _tokenizer_modules(src: Path, classes: tuple[str, ...] = ("BertTokenizer", "CLIPTokenizer")) -> set[str]:
    """The model families AutoTokenizer imports to find these classes (the first listing each), read from the
    copied transformers' own mapping (its version, not necessarily this environment's)."""
    import ast

    tree = ast.parse((src / "models" / "auto" / "tokenization_auto.py").read_text())
    mapping: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        target = node.targets[0] if isinstance(node, ast.Assign) and node.targets else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "TOKENIZER_MAPPING_NAMES" and node.value is not None:
            for elt in ast.walk(node.value):
                if isinstance(elt, ast.Tuple) and len(elt.elts) == 2 and isinstance(elt.elts[0], ast.Constant):
                    names = tuple(c.value for c in ast.walk(elt.elts[1])
                                  if isinstance(c, ast.Constant) and isinstance(c.value, str))
                    mapping.append((elt.elts[0].value, names))
            break
    found = set()
    for cls in classes:
        for model_type, names in mapping:
            if cls in names:
                found.add(model_type.replace("-", "_"))
                break
    return found


def copy_transformers(dist: md.Distribution, dest: Path) -> None:
    src = _package_dir(dist, "transformers")
    keep = KEEP_TRANSFORMERS_MODELS | _tokenizer_modules(src)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = _ignore(folder, names)
        if Path(folder) == src / "models":
            skip |= {n for n in names if (Path(folder) / n).is_dir() and n not in keep}
        return skip

    shutil.copytree(src, dest / "transformers", ignore=ignore)
    copy_dist_info(dist, dest)


def copy_kornia(dist: md.Distribution, dest: Path) -> None:
    shutil.copytree(_package_dir(dist, "kornia"), dest / "kornia", ignore=_ignore)
    copy_dist_info(dist, dest)
    stub = dest / "kornia_rs"
    stub.mkdir()
    (stub / "__init__.py").write_text(KORNIA_RS_STUB)
    info = dest / "kornia_rs-0.0.0+stub.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(KORNIA_RS_STUB_METADATA)


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", default=".gpu_site", help="folder to (re)create (default .gpu_site)")
    p.add_argument("--no-transformers", action="store_true", help="use the GPU image's own transformers")
    p.add_argument("--lock", default=str(LOCK), help="pins of the copied packages (default requirements-lock.txt)")
    p.add_argument("--image", default=str(IMAGE_FILE),
                   help="the GPU image's versions (default benchmarks/gpu_image.yaml)")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    pins = lock_pins(Path(args.lock))
    wanted = ["diffusers", "kornia", *([] if args.no_transformers else ["transformers"])]
    missing = [n for n in wanted if n not in pins]
    if missing:
        print(f"prepare_gpu_site: {args.lock} pins no {', '.join(missing)}", file=sys.stderr)
        return 2
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copiers = {"diffusers": copy_diffusers, "kornia": copy_kornia, "transformers": copy_transformers}
    with tempfile.TemporaryDirectory() as scratch:
        for name in wanted:
            copiers[name](source_of(name, pins[name], Path(scratch)), dest)
    check = check_site(dest, load_image(Path(args.image)))
    for line in check.notes:
        print("note: " + line)
    if check.problems:
        shutil.rmtree(dest)
        for line in check.problems:
            print("prepare_gpu_site: does not hold on the GPU image: " + line, file=sys.stderr)
        print(f"prepare_gpu_site: {dest} removed: it would fail on the GPU machine ({args.image})", file=sys.stderr)
        return 2
    print(f"{dest}: {size_mb(dest):.1f} MiB ({', '.join(sorted(x.name for x in dest.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
