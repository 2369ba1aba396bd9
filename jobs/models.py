"""Download, verify and convert every model a preset loads: one command from nothing to real weights.

    python jobs/models.py fetch [--preset paper|vlminv|zoo|sd15] [--config FILE ...] [--cache DIR]
    referee-synth models fetch ...                          # the same

Hub repositories go to huggingface_hub's cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE),
each file checked against data/models.yaml; the original Salesforce checkpoints are downloaded (resumable) to
CACHE/downloads/ and converted into CACHE/blip2-referee-vit-g and CACHE/blip-vqa-capfilt-large-480, where
the presets look (CACHE: ~/.cache/referee-synth). A second call checks and does nothing. Then run
`referee-synth doctor` with the same configs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import EXIT_FAILED, fail, run_main  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.models.fetch import DEFAULT_MODELS_DIR, Need  # noqa: E402
from pipeline.models.manifest import BASE_URL_ENV  # noqa: E402

PRESETS = sorted(p.stem for p in preset_path("paper").parent.glob("*.yaml"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="models.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fetch", help="download, verify and convert what a preset needs (a second call does nothing)")
    f.add_argument("--preset", choices=PRESETS, default=None,
                   help="the shipped preset whose models to fetch (default paper; zoo adds CLIP-L/14 and OWLv2)")
    f.add_argument("--config", action="append", default=[],
                   help="YAML config(s) layered after --preset, as synthesize takes them")
    f.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    f.add_argument("--cache", type=Path, default=None,
                   help=f"folder for the converted models and the downloads (default {DEFAULT_MODELS_DIR}, "
                        "where the presets look)")
    f.add_argument("--base-url", default=None,
                   help=f"mirror or proxy of the Salesforce files (same paths below it; also ${BASE_URL_ENV})")
    f.add_argument("--manifest", type=Path, default=None, help="another model table than data/models.yaml")
    f.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or your stored login)")
    f.add_argument("--retries", type=int, default=5, help="retries per file on connection errors and 5xx")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def needs_of(cfg: Config) -> list[Need]:
    """The models a run of ``cfg`` can load, by the config key naming each (none for the tiny / small sets):
    the SD-1.5 parts and the referee; the VQA model, CLIP and the detector when a category the config routes is
    scored with them (every routed category: the prompts are not known here); the zoo's referees."""
    from pipeline.models.sources import expand, is_local_path
    from pipeline.referees.registry import REFEREE_KINDS
    from pipeline.scoring.routing import models_needed

    m, s = cfg.models, cfg.scoring
    if m.tiny or m.small:
        return []
    named = [("models.stable_diffusion", m.stable_diffusion, "Stable Diffusion 1.5 (vae, unet, text encoder)"),
             ("models.referee", m.referee, "BLIP-2 referee")]
    used = models_needed({*s.by_category.values(), s.default})
    named += [(key, value, what) for part, key, value, what in [
        ("vqa", "models.vqa", m.vqa, "BLIP-VQA scorer"), ("clip", "scoring.clip_model", s.clip_model, "CLIPScore"),
        ("detector", "scoring.detector_model", s.detector_model, "spatial-rule detector")] if part in used]
    for i, ref in enumerate(cfg.zoo.referees):
        model = ref.model or REFEREE_KINDS[ref.kind].default_model
        if model:
            named.append((f"zoo.referees[{i}].model", model, f"zoo {ref.kind} referee"))
    return [Need(key, value, what, Path(expand(value)) if is_local_path(value) else None)
            for key, value, what in named]


def fetch_config(args: argparse.Namespace) -> Config:
    paths = [preset_path(args.preset or "paper")] + list(args.config) if args.preset or not args.config \
        else list(args.config)
    return load_config(paths, args.set)


def fetch(args: argparse.Namespace) -> int:
    from pipeline.models.download import RetryPolicy, TransientDownloadError
    from pipeline.models.fetch import Options, fetch_models
    from pipeline.models.manifest import load_manifest

    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    cfg = fetch_config(args)
    if cfg.models.tiny or cfg.models.small:
        print("nothing to fetch: the tiny and small model sets are built locally on first use")
        return 0
    manifest = load_manifest(args.manifest)
    cache = Path(args.cache or DEFAULT_MODELS_DIR).expanduser().absolute()  # the --set lines need it whole
    opts = Options(models_dir=cache, base_url=args.base_url, token=args.token, progress=not args.no_progress,
                   policy=RetryPolicy(attempts=args.retries + 1))
    try:
        lines, sets = fetch_models(needs_of(cfg), cfg.models.revision, manifest, opts)
    except TransientDownloadError as err:
        return fail(str(err), EXIT_FAILED)
    width = max(len(line.what) for line in lines) if lines else 0
    for line in lines:
        roles = f"  [{', '.join(line.roles)}]" if line.roles else ""
        print(f"{line.status:<9} {line.what:<{width}}  {line.detail}{roles}")
    if sets:
        print("the config names other folders; run with: " + " ".join(sets))
    again = [f"--preset {args.preset}"] if args.preset else []
    again += [f"--config {c}" for c in args.config] + [f"--set {s}" for s in args.set] + sets
    again += [f"--cache {cache}"] if args.cache else []
    print(f"next: referee-synth doctor{''.join(' ' + a for a in again)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return fetch(args)


if __name__ == "__main__":
    run_main(main)
