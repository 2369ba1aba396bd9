"""Copy the pure-Python packages benchmarks/gpu.py needs into a folder to carry to the GPU machine.

    python benchmarks/prepare_gpu_site.py [--dest .gpu_site] [--no-transformers]

The GPU image (Python 3.12, torch with CUDA, transformers 5.17, huggingface_hub, tokenizers,
safetensors) lacks diffusers and kornia, and has an older transformers than the one this project
is checked with (5.24). This copies, from the environment running it:

- diffusers without its ``pipelines`` sub-packages (only the models and schedulers are used),
- kornia, with a stub ``kornia_rs`` (kornia imports its Rust image I/O at import time; the
  compiled module here is built for this Python, and augmentation never calls it),
- transformers with only the model families used: auto, bert, blip, blip_2, clip; opt (BLIP-2's
  default text config); encoder_decoder and the first families AutoTokenizer finds BERT's and
  CLIP's tokenizers under (it imports them to look the classes up); and those diffusers imports
  when it loads (dinov2, dinov2_with_registers, siglip, vit, vit_mae). ``--no-transformers``
  keeps the GPU image's own.

No byte code, no network. Then on the GPU machine (``.gpu_site`` is git-ignored via
.git/info/exclude and named in the run's ``carry``):

    PYTHONPATH=.gpu_site python3 benchmarks/gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

# The model families used here, and those diffusers imports at import time (autoencoder_rae, ip_adapter).
KEEP_TRANSFORMERS_MODELS = {
    "auto", "bert", "blip", "blip_2", "clip", "opt", "encoder_decoder",
    "dinov2", "dinov2_with_registers", "siglip", "vit", "vit_mae",
}
KORNIA_RS_STUB = '''"""Stub of kornia_rs for benchmarks/gpu.py: kornia imports it, augmentation never calls it."""


class _Missing:
    def __getattr__(self, name):
        raise ImportError(f"kornia_rs.io.{name} is a stub on this machine (benchmarks/prepare_gpu_site.py)")


io = _Missing()
__version__ = "0.0.0-stub"
'''


def _package_dir(name: str) -> Path:
    module = importlib.import_module(name)
    return Path(module.__file__).resolve().parent


def _ignore(src: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}


def copy_diffusers(dest: Path) -> None:
    src = _package_dir("diffusers")

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = _ignore(folder, names)
        if Path(folder) == src / "pipelines":
            skip |= {n for n in names if (Path(folder) / n).is_dir()}
        return skip

    shutil.copytree(src, dest / "diffusers", ignore=ignore)


def _tokenizer_modules(classes: tuple[str, ...] = ("BertTokenizer", "CLIPTokenizer")) -> set[str]:
    """The model families AutoTokenizer imports to find these classes (the first listing each)."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, model_type_to_module_name

    found = set()
    for cls in classes:
        for model_type, names in TOKENIZER_MAPPING_NAMES.items():
            if cls in (names if isinstance(names, (tuple, list)) else (names,)):
                found.add(model_type_to_module_name(model_type))
                break
    return found


def copy_transformers(dest: Path) -> None:
    src = _package_dir("transformers")
    keep = KEEP_TRANSFORMERS_MODELS | _tokenizer_modules()

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = _ignore(folder, names)
        if Path(folder) == src / "models":
            skip |= {n for n in names if (Path(folder) / n).is_dir() and n not in keep}
        return skip

    shutil.copytree(src, dest / "transformers", ignore=ignore)


def copy_kornia(dest: Path) -> None:
    shutil.copytree(_package_dir("kornia"), dest / "kornia", ignore=_ignore)
    stub = dest / "kornia_rs"
    stub.mkdir()
    (stub / "__init__.py").write_text(KORNIA_RS_STUB)


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", default=".gpu_site", help="folder to (re)create (default .gpu_site)")
    p.add_argument("--no-transformers", action="store_true", help="use the GPU image's own transformers")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    copy_diffusers(dest)
    copy_kornia(dest)
    if not args.no_transformers:
        copy_transformers(dest)
    print(f"{dest}: {size_mb(dest):.1f} MiB ({', '.join(sorted(x.name for x in dest.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
