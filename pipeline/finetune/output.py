"""The finetune's output folder: the LoRA diffusers loads, its model card, the loss curve, and checkpoints."""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.finetune.data import RunInventory
from pipeline.finetune.loop import FinetuneLoop
from pipeline.finetune.lora import adapted_layers, save_lora
from pipeline.finetune.record import objective_record
from pipeline.io import storage
from pipeline.models.lora_files import CARD_JSON, CARD_MD, LORA_FILE

LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def card(cfg: Config, base_model: str, runs: list[tuple[RunInventory, float]], loop: FinetuneLoop,
         world: int, seconds: float, device: str, lora_sha256: str) -> dict[str, Any]:
    fcfg = cfg.finetune
    samples = loop.step * fcfg.batch_size * world
    return {
        "base_model": base_model,
        "steps": loop.step,
        "processes": world,
        "global_batch": fcfg.batch_size * world,
        "samples_seen": samples,
        "device": device,
        # wall time of the training steps over every resume (model loading excluded) and of this invocation
        "training_seconds": round(loop.seconds, 3),
        "invocation_seconds": round(seconds, 3),
        "samples_per_s": round(samples / max(loop.seconds, 1e-9), 4),
        # device-hours of the training (processes x step time): the table's training cost
        "training_device_hours": round(loop.seconds * world / 3600, 6),
        "runs": [{"uri": inv.uri, "weight": w, "config_hash": inv.config_hash, "generator": inv.generator,
                  "accepted": inv.accepted, "data_device_hours": round(inv.gpu_seconds / 3600, 6)} for inv, w in runs],
        "adapted_layers": {"unet": adapted_layers(loop.parts.unet),
                           "text_encoder": adapted_layers(loop.parts.text_encoder)},
        "lora_file": LORA_FILE,
        "lora_sha256": lora_sha256,
        "finetune": {k: v for k, v in vars(fcfg).items()},
        "objective": objective_record(fcfg, base_model, world),
        "final_loss": loop.history[-1][1] if loop.history else None,
    }


def _markdown(c: dict[str, Any]) -> str:
    runs = "\n".join(f"| {r['uri']} | {r['weight']} | {r['config_hash']} | {r['generator']} | {r['accepted']} |"
                     for r in c["runs"])
    devs = "\n".join(f"- **{d['point']}**: GORS {d['gors']}; ours {d['ours']} ({d['why']})"
                     for d in c["objective"]["deviations"])
    return (
        f"---\nbase_model: {c['base_model']}\nlibrary_name: diffusers\n"
        "tags: [lora, text-to-image, gors, referee-synth]\n---\n\n"
        f"# GORS-style LoRA (referee-synth finetune)\n\n"
        f"`pipe.load_lora_weights(THIS_FOLDER)` on a `StableDiffusionPipeline` of `{c['base_model']}`; or sample "
        f"through the job: `referee-synth synthesize --generator sd_sampling --set sampling.lora=THIS_FOLDER ...`.\n\n"
        f"Steps {c['steps']} x global batch {c['global_batch']} ({c['processes']} process(es), {c['device']}); "
        f"{c['training_device_hours']:.4f} device-hours of training; final loss {c['final_loss']}.\n"
        f"LoRA rank {c['finetune']['rank']}, alpha {c['finetune']['alpha']}, adapted layers: "
        f"UNet {c['adapted_layers']['unet']}, text encoder {c['adapted_layers']['text_encoder']}.\n\n"
        f"## Data\n\n| run | weight | config hash | generator | accepted |\n|---|---|---|---|---|\n{runs}\n\n"
        f"## Objective\n\n{c['objective']['objective']}.\n\nSelection: {c['objective']['selection']}.\n\n"
        f"## Loss\n\n![loss curve]({LOSS_PNG})\n\n"
        f"## Where this differs from GORS as shipped\n\n{devs}\n\nMachine-readable: `{CARD_JSON}`; loss curve: "
        f"`{LOSS_CSV}`.\n"
    )


def write_loss_csv(path: Path, history: list[list[float]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "loss"])
        for step, loss in history:
            w.writerow([int(step), f"{loss:.6g}"])


def plot_loss(path: Path, history: list[list[float]]) -> None:
    """The loss curve (each step's loss and a running mean over 1% of the steps) for the card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(h[0]) for h in history]
    losses = [float(h[1]) for h in history]
    window = max(1, len(losses) // 100)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward-weighted MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_output(output: str, cfg: Config, base_model: str, runs: list[tuple[RunInventory, float]],
                 loop: FinetuneLoop, world: int, seconds: float, device: str) -> dict[str, Any]:
    """Write the LoRA, finetune.json, README.md and loss.csv to ``output`` (local or an object store)."""
    fs, out = storage.filesystem_for(output)
    with tempfile.TemporaryDirectory(prefix="finetune-out-") as tmp:
        local = Path(tmp)
        lora_path = save_lora(local, loop.parts.unet, loop.parts.text_encoder, cfg.finetune)
        digest = hashlib.sha256(lora_path.read_bytes()).hexdigest()
        c = card(cfg, base_model, runs, loop, world, seconds, device, digest)
        (local / CARD_JSON).write_text(json.dumps(c, indent=1, default=str))
        (local / CARD_MD).write_text(_markdown(c))
        write_loss_csv(local / LOSS_CSV, loop.history)
        plot_loss(local / LOSS_PNG, loop.history)
        for name in (LORA_FILE, LOSS_CSV, LOSS_PNG, CARD_MD, CARD_JSON):  # the card last: its presence means complete
            storage.upload_file_atomic(fs, str(local / name), storage.join(out, name))
    return c


# ---- single-process checkpoints: OUTPUT/checkpoints/step-NNNNNNN/, latest.json names the newest ----

def publish_checkpoint(output: str, step: int, folder: str, kept: int) -> str:
    fs, out = storage.filesystem_for(output)
    name = f"step-{step:07d}"
    for f in sorted(Path(folder).iterdir()):
        storage.upload_file_atomic(fs, str(f), storage.join(out, CHECKPOINTS, name, f.name))
    storage.write_atomic(fs, storage.join(out, CHECKPOINTS, LATEST), json.dumps({"step": step, "name": name}).encode())
    _prune(fs, out, kept)
    return name


def _prune(fs: Any, out: str, kept: int) -> None:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(storage.join(out, CHECKPOINTS), allow_not_found=True)
    names = sorted(i.path.rsplit("/", 1)[-1] for i in fs.get_file_info(sel) if i.type == pafs.FileType.Directory)
    for name in [n for n in names if n.startswith("step-")][:-kept]:
        fs.delete_dir(storage.join(out, CHECKPOINTS, name))


def fetch_latest_checkpoint(output: str, dest: Path) -> int | None:
    """Copy the newest checkpoint into ``dest``; its step, or None when there is none."""
    import pyarrow.fs as pafs

    fs, out = storage.filesystem_for(output)
    latest = storage.join(out, CHECKPOINTS, LATEST)
    if not storage.exists(fs, latest):
        return None
    info = json.loads(storage.read_bytes(fs, latest))
    sel = pafs.FileSelector(storage.join(out, CHECKPOINTS, info["name"]))
    for f in fs.get_file_info(sel):
        (dest / f.path.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(fs, f.path))
    return int(info["step"])
