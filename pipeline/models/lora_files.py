"""A finetuned LoRA folder's files, readable without torch or peft (config hashing, job drivers)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import Config, ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes and loads
CARD_JSON = "finetune.json"  # what made it: runs, config hashes, steps, the objective's record
CARD_MD = "README.md"


def _read(folder: str, name: str) -> bytes:
    from pipeline.io import storage

    fs, root = storage.filesystem_for(folder)
    path = storage.join(root, name)
    if not storage.exists(fs, path):
        raise ConfigError(
            f"config: sampling.lora {folder!r} has no {name} (a folder written by referee-synth finetune)")
    return storage.read_bytes(fs, path)


def lora_digest(folder: str) -> str:
    """SHA-256 of the LoRA weights file (what the samples' config hash records, not the path)."""
    return hashlib.sha256(_read(folder, LORA_FILE)).hexdigest()


def local_lora_folder(folder: str, dest: str) -> str:
    """A local folder with the LoRA's weights: ``folder`` itself, or a copy in ``dest`` of an object-store one."""
    if "://" not in folder:
        return folder
    from pathlib import Path

    (Path(dest) / LORA_FILE).write_bytes(_read(folder, LORA_FILE))
    return dest


def lora_label(folder: str) -> str:
    """How samples record the LoRA: its folder and the digest of its weights."""
    return f"{folder}#sha256={lora_digest(folder)[:16]}"


def lora_card(folder: str) -> dict[str, Any]:
    """The folder's finetune.json ({} when it has none, e.g. a LoRA made elsewhere)."""
    try:
        return json.loads(_read(folder, CARD_JSON))
    except ConfigError:
        return {}


def resolve_lora(cfg: Config) -> Config:
    """Fill ``sampling.lora_sha256`` from the weights ``sampling.lora`` names (the config hash holds the digest,
    not the path); the job resolves it once, so workers hash the same weights the driver read."""
    cfg.sampling.lora_sha256 = lora_digest(cfg.sampling.lora) if cfg.sampling.lora else ""
    return cfg
