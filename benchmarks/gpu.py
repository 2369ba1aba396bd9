"""GPU benchmark (H100 / H200): the engine at real model sizes against its FLOP floor.

    python3 benchmarks/gpu.py --out results.json [--batches 1,2,3,4,5,6,7,8] [--view-chunks 0,120,60,30]
    python benchmarks/gpu.py --dry-run --out /tmp/gpu.json      # tiny models on the CPU: plumbing only
    python3 benchmarks/gpu.py --out ee.json --batches 4 --view-chunks 0 --skip-reference --early-exit

Real-size architectures (``benchmarks/real_models.py``) with random weights, built on the GPU; the
paper preset (bf16 autocast, float32 weights, 30 views, 150 + 10 iterations). For every batch size
and view chunk the engine first runs ``--warmup`` joint and tail iterations and its final pass
(allocator, kernels, compilation), then ``--timed`` of each, every one timed alone (synchronised);
seconds per image are extrapolated to the preset's full schedule: (iterations x joint step + tail
x tail step + final pass) / batch + VQA scoring per image. Recorded per configuration: seconds
per image, images per hour, achieved TFLOP/s (FLOPs of the same steps counted on the device with
FlopCounterMode), the floor from ``benchmarks/flops.py`` at the nominal 989 TFLOP/s and at the
bf16 matmul rate measured here, peak GPU memory, or ``oom``. Each sweep configuration runs with
the OOM fallback off (so a chunk that does not fit says so); one extra run shows the fallback.
Then the reference loop (``benchmarks/reference.py``: one prompt, all views, float32; also under
bf16 autocast) in the same process. The versions and the device are printed and written first; results are
written to ``--out`` after every configuration (and on SIGTERM), so a run stopped by its time limit keeps what
it measured; ``--budget-s`` plans the run: a configuration starts only when its estimated time still fits.
``--profile``, ``--compile``, ``--bf16-weights``, ``--view-chunks auto``: see benchmarks/README.md section 3
(the one command for the GPU machine).
``--early-exit``: at the best batch, the monitored engine (continuous batching) on a short schedule with and
without early exit, exits driven by a stub score trajectory (random weights score noise) while every check
pays the real BLIP-VQA cost: seconds per sample, the iteration ratio, the monitor's overhead.

The GPU image lacks diffusers, kornia (and kornia_rs) and spaCy; ``benchmarks/prepare_gpu_site.py``
copies the first two from this environment into a folder to carry (see benchmarks/README.md).
spaCy is not needed: VQA is timed with fixed questions. Tokenizers are the tiny set's (no hub):
their ids index the real embedding tables, and the prompts use only words of their vocabulary,
so token counts are realistic.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402

# Every word is in the tiny BERT vocabulary (pipeline/models/tiny.py), so BLIP-2 token counts are
# what bert-base-uncased gives these prompts (8-11 tokens with [CLS] and [SEP]).
PROMPTS = [
    "a red car and a blue bird", "a green apple on a wooden table", "a black cat near a white dog",
    "a yellow cup and a brown book", "a pink chair next to a glass table", "a round bowl and a square book",
    "an orange sphere on a metallic cube", "a fluffy dog and a leather chair",
]
QUESTIONS = [["a red car?", "a blue bird?"]] * 8  # two noun chunks each, as spaCy gives such prompts
NOMINAL_TFLOPS = 989.0


# ---- small helpers --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    return {"allocated": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved": torch.cuda.max_memory_reserved(device) / 2**30}


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """Measured bf16 matmul rate (n x n x n, random data, 3 warm-ups)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    del a, b
    free(device)
    return 2 * n**3 / dt / 1e12


PACKAGES = ("transformers", "huggingface_hub", "tokenizers", "diffusers", "kornia", "accelerate", "safetensors",
            "numpy", "peft")
# kornia 0.9's floor (its requirement torch>=2.5.1); the project tests the release in requirements-torch.txt.
TORCH_NEEDED = "2.5.1"


def tested_torch() -> str | None:
    """The torch release CI tests (requirements-torch.txt), None when the file is not there."""
    path = Path(__file__).resolve().parent.parent / "requirements-torch.txt"
    if not path.exists():
        return None
    pins = [ln.split("==", 1)[1].strip() for ln in path.read_text().splitlines() if ln.startswith("torch==")]
    return pins[0] if pins else None


def _release(version: str) -> tuple[int, ...]:
    head = version.split("+")[0]
    return tuple(int(x) for x in head.split(".")[:3] if x.isdigit())


def environment_report(device: torch.device) -> dict[str, Any]:
    """Versions (and where each package was imported from), the device, its memory: printed before anything."""
    import importlib.metadata as md
    import importlib.util

    packages = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = None
        packages[name] = {"version": version, "from": str(Path(spec.origin).parent.parent) if spec and spec.origin
                          else None}
    tested = tested_torch()
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "torch_tested": tested, "torch_needed": TORCH_NEEDED, "packages": packages, "device": "cpu",
    }
    if tested and _release(torch.__version__) < _release(tested):
        env["torch_note"] = (f"torch {torch.__version__} is older than the release CI tests ({tested}); the engine "
                             f"needs >= {TORCH_NEEDED} (kornia's floor): results stand, the combination is untested")
    if _release(torch.__version__) < _release(TORCH_NEEDED):
        env["torch_note"] = f"torch {torch.__version__} is older than {TORCH_NEEDED}: kornia 0.9 does not support it"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free_b, total_b = torch.cuda.mem_get_info(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=total_b / 2**30, free_gib=free_b / 2**30, cudnn=torch.backends.cudnn.version())
    return env


def describe_environment(env: dict[str, Any]) -> str:
    pk = ", ".join(f"{k} {v['version']}" for k, v in env["packages"].items() if v["version"])
    dev = env["device"] + (f" (sm {env['capability']}, {env['memory_gib']:.0f} GiB, {env['free_gib']:.0f} free)"
                           if "capability" in env else "")
    lines = [f"device {dev}; python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}); {pk}"]
    if env.get("torch_note"):
        lines.append("note: " + env["torch_note"])
    return "\n".join(lines)


class BudgetPlan:
    """Starts a piece of work only when the time it is expected to take still fits the budget.

    The estimate of a piece is the largest seconds-per-unit seen so far (units: images of a configuration)
    times its units, plus a margin; with nothing seen yet, ``first_guess`` seconds."""

    def __init__(self, budget_s: float, first_guess: float = 60.0, margin: float = 1.25) -> None:
        self.budget_s, self.first_guess, self.margin = budget_s, first_guess, margin
        self.t0 = time.perf_counter()
        self.per_unit: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def estimate(self, units: float) -> float:
        return self.first_guess if self.per_unit is None else self.margin * self.per_unit * units

    def fits(self, units: float = 1.0) -> bool:
        return self.elapsed() + self.estimate(units) <= self.budget_s

    def record(self, seconds: float, units: float = 1.0) -> None:
        rate = seconds / max(units, 1e-9)
        self.per_unit = rate if self.per_unit is None else max(self.per_unit, rate)


# ---- models ---------------------------------------------------------------------------------------


def real_model_sets(device: torch.device, dtype: torch.dtype):
    """GeneratorModels / VqaModels at real sizes with random weights, and the tiny set's tokenizers."""
    from diffusers import DDPMScheduler

    from benchmarks.real_models import build_real_models
    from pipeline.models.loading import GeneratorModels, VqaModels
    from pipeline.models.tiny import build_tokenizers

    real = build_real_models(device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        bert, clip = build_tokenizers(Path(tmp))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    gen = GeneratorModels(
        vae=real.vae, unet=real.unet, text_encoder=real.text_encoder, clip_tokenizer=clip, scheduler=scheduler,
        referee=real.referee, caption_head=real.caption_head, referee_tokenizer=bert, device=device, dtype=dtype,
        sources={"stable_diffusion": "random:sd-1.5", "referee": "random:blip2-itm-vit-g", "vqa": "random:blip-vqa"},
    )
    vqa = VqaModels(model=real.vqa, tokenizer=bert, device=device, dtype=dtype, source="random:blip-vqa")
    return gen, vqa


def tiny_model_sets(cfg: Config):
    from pipeline.models.loading import load_generator_models, load_vqa_models

    return load_generator_models(cfg), load_vqa_models(cfg)


def make_scorer(vqa_models: Any, cfg: Config):
    """A VqaScorer that does not need spaCy (the GPU image lacks it): questions are given."""
    import pipeline.scoring.vqa as vqa_mod

    try:
        return vqa_mod.VqaScorer(vqa_models, cfg)
    except Exception:  # noqa: BLE001 - spaCy or its model missing: score fixed questions instead
        # Both lookups the scorer may make (real weights: spacy_model_info; tiny/small: warn_spacy_version).
        saved = vqa_mod.spacy_model_info, vqa_mod.warn_spacy_version
        vqa_mod.spacy_model_info = lambda name: {"name": "unavailable", "version": None}
        vqa_mod.warn_spacy_version = lambda vcfg: {"name": "unavailable", "version": None}
        try:
            return vqa_mod.VqaScorer(vqa_models, cfg)
        finally:
            vqa_mod.spacy_model_info, vqa_mod.warn_spacy_version = saved


# ---- measurements ---------------------------------------------------------------------------------


def short_schedule(cfg: Config, warmup: int, timed: int) -> Config:
    c = copy.deepcopy(cfg)
    c.optim.iterations = warmup + timed
    c.optim.tail_iterations = warmup + timed if cfg.optim.tail_iterations else 0
    c.optim.warmup = 1
    c.optim.ema_restarts = []
    return c


def requests(n: int, seed0: int = 1000):
    from pipeline.engine.invert import SampleRequest

    return [SampleRequest(PROMPTS[i % len(PROMPTS)], f"bench{i}", 0, seed0 + i) for i in range(n)]


def _timed(fn: Callable, bucket: list[float], device: torch.device) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync(device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        bucket.append(time.perf_counter() - t0)
        return out

    return wrapper


def count_step_flops(gen: Any, cfg: Config) -> dict[str, float]:
    """FLOPs of one joint step, one tail step and the final pass at batch 1, counted on the device."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.engine.invert import InversionEngine

    c = short_schedule(cfg, 0, 1)
    c.engine.batch_size, c.engine.max_restarts = 1, 0
    engine = InversionEngine(gen, c)
    counts: dict[str, float] = {}

    def counted(name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with FlopCounterMode(display=False) as counter:
                out = fn(*args, **kwargs)
            counts[name] = counts.get(name, 0) + counter.get_total_flops()
            return out

        return wrapper

    engine._joint_step = counted("joint_step", engine._joint_step)
    engine._tail_step = counted("tail_step", engine._tail_step)
    engine._finish = counted("finish", engine._finish)
    engine.run(requests(1))
    return counts


def engine_config(gen: Any, cfg: Config, batch: int, chunk: int, warmup: int, timed: int, fallback: bool,
                  step_flops: dict[str, float], vqa_seconds: float) -> dict[str, Any]:
    """One engine configuration: a warm-up run of ``warmup`` joint + tail iterations (and the final
    pass; with engine.compile that is where compilation happens), then a run of ``timed`` of each."""
    from pipeline.engine.invert import InversionEngine

    device = gen.device
    c = short_schedule(cfg, 0, timed)
    c.engine.batch_size, c.engine.view_chunk, c.engine.max_restarts = batch, max(chunk, 0), 0
    c.engine.auto_view_chunk = chunk == AUTO_CHUNK
    c.engine.oom_fallback = fallback
    engine = InversionEngine(gen, c)
    warm_cfg = short_schedule(c, 0, max(warmup, 1))
    engine.cfg = warm_cfg
    engine.run(requests(batch))
    engine.cfg = c
    joint: list[float] = []
    tail: list[float] = []
    finish: list[float] = []
    engine._joint_step = _timed(engine._joint_step, joint, device)
    engine._tail_step = _timed(engine._tail_step, tail, device)
    engine._finish = _timed(engine._finish, finish, device)
    reset_peak(device)
    t0 = time.perf_counter()
    results = engine.run(requests(batch))
    wall = time.perf_counter() - t0
    tj, tt = mean(joint), mean(tail) if tail else 0.0
    it, tail_it = cfg.optim.iterations, cfg.optim.tail_iterations
    optimise = it * tj + tail_it * tt + finish[-1]
    per_image = optimise / batch + vqa_seconds
    flops_image = it * step_flops["joint_step"] + tail_it * step_flops.get("tail_step", 0) + step_flops["finish"]
    return {
        "status": "ok", "batch": batch, "view_chunk": chunk, "oom_fallback": fallback,
        "joint_step_seconds": tj, "tail_step_seconds": tt, "finish_seconds": finish[-1],
        "joint_steps_seconds_all": joint, "run_wall_seconds": wall,
        "seconds_per_image": per_image, "images_per_hour": 3600 / per_image,
        "engine_seconds_per_image": optimise / batch,
        "joint_step_tflops": batch * step_flops["joint_step"] / tj / 1e12,
        "engine_tflops": batch * flops_image / optimise / 1e12,
        "peak_gib": peak_gib(device), "oom_fallbacks": engine.oom_fallbacks, "final_view_chunk": engine.view_chunk,
        "chunk_plan": engine.chunk_plan.describe() if engine.chunk_plan else None,
        "compile": c.engine.compile, "cast_weights": c.engine.cast_weights,
        "failed_samples": sum(r.error is not None for r in results),
    }


COMPONENTS = ("sds", "decode", "augment", "referee_forward", "referee_backward", "optimizer")


def _annotated(fn: Callable, name: str) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e6


def profile_steps(gen: Any, cfg: Config, batch: int, chunk: int, steps: int, compile_: bool = False,
                  cast: bool = False) -> dict[str, Any]:
    """``steps`` joint steps (after one warm-up run) under torch.profiler: the time of each component (GPU kernel
    time inside its annotation on CUDA, CPU time otherwise), the GPU busy share (union of kernel intervals over
    the steps' wall time) and the launch count per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from pipeline.engine.invert import InversionEngine

    device = gen.device
    c = short_schedule(cfg, 0, 1)
    c.engine.batch_size, c.engine.view_chunk, c.engine.max_restarts = batch, max(chunk, 0), 0
    c.engine.auto_view_chunk = chunk == AUTO_CHUNK
    c.engine.compile, c.engine.oom_fallback = compile_, False
    c.engine.cast_weights = "bf16" if cast else c.engine.cast_weights
    engine = InversionEngine(gen, c)
    engine.run(requests(batch))  # warm-up (and compilation)
    engine.sds.grad = _annotated(engine.sds.grad, "sds")
    engine._decode = _annotated(engine._decode, "decode")
    engine.augmenter.forward = _annotated(engine.augmenter.forward, "augment")
    engine._referee_losses = _annotated(engine._referee_losses, "referee_forward")
    c_long = short_schedule(c, 0, steps)
    c_long.optim.tail_iterations = 0
    engine.cfg = c_long
    original_backward = torch.Tensor.backward
    step_marks: list[float] = []

    def backward(self: torch.Tensor, *a: Any, **k: Any) -> None:
        with torch.profiler.record_function("referee_backward"):
            original_backward(self, *a, **k)

    def joint(*a: Any, **k: Any) -> Any:
        sync(device)
        step_marks.append(time.perf_counter())
        out = joint_step(*a, **k)
        sync(device)
        step_marks.append(time.perf_counter())
        return out

    joint_step = engine._joint_step
    engine._joint_step = joint
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    torch.Tensor.backward = backward
    try:
        with profile(activities=activities) as prof:
            engine.run(requests(batch))
    finally:
        torch.Tensor.backward = original_backward
    events = prof.events()
    cuda = device.type == "cuda"
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               and e.name not in COMPONENTS] if cuda else []
    wall = sum(b - a for a, b in zip(step_marks[::2], step_marks[1::2]))
    out: dict[str, Any] = {"status": "ok", "batch": batch, "view_chunk": engine.view_chunk, "steps": steps,
                           "compile": compile_, "cast_weights": c.engine.cast_weights,
                           "joint_step_seconds": wall / max(steps, 1), "clock": "gpu kernels" if cuda else "cpu"}
    per: dict[str, float] = {}
    for name in COMPONENTS:
        spans = [e for e in events if e.name == name]
        if cuda:
            inside = [(k.time_range.start, k.time_range.end) for k in kernels
                      if any(s.time_range.start <= k.time_range.start < s.time_range.end for s in spans
                             if s.device_type == DeviceType.CUDA)]
            per[name] = _union_seconds(inside) / max(steps, 1)
        else:
            per[name] = sum(s.cpu_time_total for s in spans) / 1e6 / max(steps, 1)
    out["component_seconds_per_step"] = per
    if cuda:
        busy = _union_seconds([(k.time_range.start, k.time_range.end) for k in kernels])
        out["gpu_busy_share"] = busy / wall if wall else None
        out["kernels_per_step"] = len(kernels) / max(steps, 1)
        out["peak_gib"] = peak_gib(device)
    return out


def reference_run(gen: Any, cfg: Config, style: str, autocast: bool, warmup: int, timed: int) -> dict[str, Any]:
    from benchmarks.reference import ReferenceLoop

    device = gen.device
    c = short_schedule(cfg, 0, timed)
    marks: list[tuple[str, float]] = []

    def on_step(i: int, phase: str) -> None:
        sync(device)
        marks.append((phase, time.perf_counter()))

    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
    with ctx:  # warm-up: one joint and one tail iteration and the final pass
        ReferenceLoop(gen, short_schedule(cfg, 0, max(warmup, 1)), style).run(requests(1))
    loop = ReferenceLoop(gen, c, style, on_step=on_step)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    with ctx:
        loop.run(requests(1))
    sync(device)
    t_end = time.perf_counter()
    times, prev = {"joint": [], "tail": []}, t0
    for phase, t in marks:
        times[phase].append(t - prev)
        prev = t
    tj, tt = mean(times["joint"]), mean(times["tail"]) if times["tail"] else 0.0
    finish = t_end - prev
    per_image = cfg.optim.iterations * tj + cfg.optim.tail_iterations * tt + finish
    return {"status": "ok", "style": style, "autocast_bf16": autocast, "joint_step_seconds": tj,
            "tail_step_seconds": tt, "finish_seconds": finish, "engine_seconds_per_image": per_image,
            "peak_gib": peak_gib(device)}


def vqa_seconds_per_image(scorer: Any, device: torch.device, batch: int, size: int) -> float:
    images = [torch.rand(3, size, size, device=device) for _ in range(batch)]
    with torch.no_grad():
        scorer.answer_probs(images, QUESTIONS[:batch])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        scorer.answer_probs(images, QUESTIONS[:batch])
        sync(device)
    return (time.perf_counter() - t0) / batch


def early_exit_run(gen: Any, cfg: Config, scorer: Any, batch: int, chunk: int, iterations: int, every: int,
                   samples: int) -> dict[str, Any]:
    """Early exit at this size: ``samples`` requests through the monitored engine (continuous batching),
    ``iterations`` + 2 tail, a check every ``every``, once with exits and once without. Scores are a stub
    trajectory (benchmarks/early_exit.py ``Trajectory``: random weights give noise scores), but each check
    also runs the real BLIP-VQA scorer on the checked images, so its cost is the product's. Sample j crosses
    the threshold at check 1 + j mod (checks + 1): the last class never exits."""
    from benchmarks.score_trajectory import Trajectory
    from pipeline.engine.invert import InversionEngine

    device = gen.device
    c = short_schedule(cfg, 0, iterations)
    c.optim.tail_iterations = min(2, cfg.optim.tail_iterations)
    c.engine.batch_size, c.engine.view_chunk, c.engine.max_restarts = batch, chunk, 0
    c.monitor.enabled, c.monitor.every, c.monitor.patience, c.monitor.margin = True, every, 1, 0.0
    checks = (iterations - 1) // every
    reqs = requests(samples)
    crossing = {f"{r.prompt_id}/{r.sample_index}": 1 + j % (checks + 1) for j, r in enumerate(reqs)}
    out: dict[str, Any] = {"status": "ok", "batch": batch, "view_chunk": chunk, "iterations": iterations,
                           "tail": c.optim.tail_iterations, "every": every, "samples": samples}
    for name in ("no_exit", "early_exit"):
        c.monitor.early_exit = name == "early_exit"
        engine = InversionEngine(gen, c)
        stub = Trajectory(crossing, 0.5, 0.0)
        check_seconds: list[float] = []

        def monitor(images, reqs_, _stub=stub, _bucket=check_seconds):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                scorer.answer_probs([im.to(device) for im in images], QUESTIONS[: len(images)])
            sync(device)
            _bucket.append(time.perf_counter() - t0)
            return _stub(images, reqs_)

        engine.monitor_score = monitor
        sync(device)
        reset_peak(device)
        t0 = time.perf_counter()
        results = engine.run(copy.deepcopy(reqs))
        sync(device)
        wall = time.perf_counter() - t0
        out[name] = {
            "wall_seconds": wall, "seconds_per_sample": wall / samples,
            "iterations": sum(r.iterations for r in results),
            "early_exits": sum(r.exit_reason == "early_exit" for r in results),
            "monitor_seconds": sum(r.monitor_seconds for r in results), "vqa_check_seconds": sum(check_seconds),
            "peak_gib": peak_gib(device), "failed_samples": sum(r.error is not None for r in results),
        }
    a, b = out["no_exit"], out["early_exit"]
    out["iteration_ratio"] = a["iterations"] / b["iterations"]
    out["seconds_ratio"] = a["wall_seconds"] / b["wall_seconds"]
    out["monitor_overhead_no_exit"] = a["monitor_seconds"] / a["wall_seconds"]
    return out


# ---- main -----------------------------------------------------------------------------------------


AUTO_CHUNK = -1  # --view-chunks auto: engine.auto_view_chunk (from the device's free memory)


def parse_ints(text: str) -> list[int]:
    return [AUTO_CHUNK if x.strip() == "auto" else int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results (written after every configuration)")
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: check the plumbing, no GPU")
    p.add_argument("--config", help="preset (default: configs/paper.yaml; configs/tiny.yaml with --dry-run)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--batches", type=parse_ints, help="batch sizes (default 1,2,3,4,5,6,7,8; 1,2 dry-run)")
    p.add_argument("--view-chunks", type=parse_ints,
                   help="view chunks per batch, 0 = all views (default 0,120,60,30; 0,2 dry-run); chunks >= "
                        "batch x views are skipped (same as 0)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per configuration")
    p.add_argument("--timed", type=int, default=2, help="timed iterations per configuration")
    p.add_argument("--bf16-weights", action="store_true",
                   help="also run the best configuration with engine.cast_weights bf16 (frozen Linear/Conv weights "
                        "stored in bf16 once; with --compile, compiled too); runs last: it casts the shared models")
    p.add_argument("--compile", action="store_true", help="also run the best configuration with engine.compile")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over --profile-steps joint steps at the best configuration (eager, and "
                        "compiled with --compile): seconds per component, GPU busy share, kernels per step")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--early-exit", action="store_true",
                   help="also measure early exit at the best batch (monitored engine, stub score trajectory, real "
                        "VQA cost per check): seconds per sample with and without exits")
    p.add_argument("--early-exit-iterations", type=int, default=20, help="referee iterations of that run (8 dry-run)")
    p.add_argument("--early-exit-every", type=int, default=5, help="check interval of that run (2 dry-run)")
    p.add_argument("--tflops", type=float, default=NOMINAL_TFLOPS, help="nominal rate for the floor")
    p.add_argument("--budget-s", "--budget", dest="budget", type=float, default=420.0,
                   help="seconds the run plans for: a configuration starts only when its estimated time (from "
                        "those measured so far) still fits (default 420: the run ends under 8 min)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = BudgetPlan(args.budget)
    t_start = plan.t0
    out = Path(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if not args.dry_run and torch.cuda.is_available() else "cpu")
    # First of all: what runs where (a run that dies later still says it), printed and written.
    env = environment_report(device)
    print(describe_environment(env), flush=True)
    result: dict[str, Any] = {"dry_run": args.dry_run, "environment": env, "torch": env["torch"],
                              "python": env["python"], "device": env["device"], "budget_seconds": args.budget,
                              "configs": [], "reference": [], "errors": []}
    write_json(out, result)
    if args.dry_run:
        cfg_path = Path(args.config) if args.config else preset_path("tiny")
        cache = os.environ.get("REFEREE_SYNTH_CACHE", "")
        cfg = load_config(cfg_path, ["models.device=cpu", *([f"models.tiny_cache_dir={cache}"] if cache else []),
                                     "engine.compile_backend=eager", *args.set])  # tracing only: no C++ builds
        batches, chunks = args.batches or [1, 2], args.view_chunks or [0, 2]
    else:
        if device.type != "cuda":
            print("gpu.py: no CUDA device is visible; use --dry-run for the CPU check", file=sys.stderr)
            return 2
        cfg_path = Path(args.config) if args.config else preset_path("paper")
        cfg = load_config(cfg_path, args.set)
        batches, chunks = args.batches or list(range(1, 9)), args.view_chunks or [0, 120, 60, 30]
    result.update({
        "config": str(cfg_path), "overrides": args.set,
        "schedule": {"iterations": cfg.optim.iterations, "tail_iterations": cfg.optim.tail_iterations,
                     "num_views": cfg.augment.num_views, "top_k": cfg.augment.top_k},
        "warmup": args.warmup, "timed": args.timed,
    })

    def save() -> None:
        result["elapsed_seconds"] = time.perf_counter() - t_start
        write_json(out, result)

    def on_term(signum: int, frame: Any) -> None:  # `timeout` sends SIGTERM: keep what was measured
        result["interrupted"] = f"signal {signum} at {time.perf_counter() - t_start:.0f} s"
        save()
        sys.exit(124)

    previous_handler = signal.signal(signal.SIGTERM, on_term)

    def over_budget(units: float = 1.0) -> bool:
        return not plan.fits(units)

    def attempt(what: str, fn: Callable[[], dict[str, Any]], units: float = 1.0) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            return fn()
        except torch.cuda.OutOfMemoryError as err:
            return {"status": "oom", "error": str(err).splitlines()[0][:300] if str(err) else "oom"}
        except Exception as err:  # noqa: BLE001 - record and go on with the next configuration
            result["errors"].append({"what": what, "error": f"{type(err).__name__}: {err}",
                                     "traceback": traceback.format_exc()[-3000:]})
            return {"status": "error", "error": f"{type(err).__name__}: {err}"}
        finally:
            plan.record(time.perf_counter() - t0, units)
            free(device)

    result["matmul_bf16_tflops"] = matmul_tflops(device)
    from benchmarks.flops import count as count_flops_meta

    floor_cfg = copy.deepcopy(cfg)
    if args.dry_run:  # the tiny schedule at real sizes is still a meaningful floor for the preset given
        floor_cfg.latent.size = 64
    flops = count_flops_meta(floor_cfg, args.tflops)
    result["floor"] = {
        "flops_per_image": flops["total_flops"], "nominal_tflops": args.tflops,
        "seconds_per_image_nominal": flops["floor_seconds_per_image"],
        "seconds_per_image_measured_rate": (flops["total_flops"] / (result["matmul_bf16_tflops"] * 1e12)
                                            if result["matmul_bf16_tflops"] else None),
        "groups": flops["groups"],
    }
    save()
    t0 = time.perf_counter()
    if args.dry_run:
        gen, vqa_models = tiny_model_sets(cfg)
    else:
        gen, vqa_models = real_model_sets(device, torch.float32)
    result["model_build_seconds"] = time.perf_counter() - t0
    print(f"models ready in {result['model_build_seconds']:.1f} s", flush=True)
    scorer = make_scorer(vqa_models, cfg)
    result["vqa_seconds_per_image"] = {str(b): vqa_seconds_per_image(scorer, device, b, cfg.latent.size * 8)
                                       for b in sorted({1, max(batches)})}
    vqa_s = result["vqa_seconds_per_image"][str(max(batches))]
    result["step_flops_batch1"] = count_step_flops(gen, cfg)
    sf = result["step_flops_batch1"]
    result["flops_per_image_on_device"] = (cfg.optim.iterations * sf["joint_step"]
                                           + cfg.optim.tail_iterations * sf.get("tail_step", 0) + sf["finish"])
    save()

    n = cfg.augment.num_views
    for b in batches:
        for chunk in chunks:
            if chunk and chunk >= b * n:
                continue  # the same as all views at once
            if over_budget(b):
                result["configs"].append({"status": "skipped (budget)", "batch": b, "view_chunk": chunk,
                                          "estimated_seconds": plan.estimate(b)})
                continue
            r = attempt(f"engine b={b} chunk={chunk}", lambda b=b, chunk=chunk: engine_config(
                gen, cfg, b, chunk, args.warmup, args.timed, False, sf, vqa_s), units=b)
            r.setdefault("batch", b)
            r.setdefault("view_chunk", chunk)
            result["configs"].append(r)
            print(_describe(r), flush=True)
            save()

    ok = [r for r in result["configs"] if r.get("status") == "ok"]
    best = min(ok, key=lambda r: r["seconds_per_image"]) if ok else None
    result["best"] = best
    oomed = [r for r in result["configs"] if r.get("status") == "oom" and r.get("view_chunk") == 0]
    # The fallback at work where all views at once did not fit.
    if oomed and not over_budget(max(r["batch"] for r in oomed)):
        b = max(r["batch"] for r in oomed)
        r = attempt("oom fallback", lambda: engine_config(gen, cfg, b, 0, args.warmup, args.timed, True, sf, vqa_s),
                    units=b)
        r.update(batch=b, view_chunk=0, note="oom_fallback on: view_chunk halves until the pass fits")
        result["oom_fallback_run"] = r
        print("fallback: " + _describe(r), flush=True)
        save()
    if not args.skip_reference:
        for style, autocast in (("authors", False), ("authors", True), ("plain", False)):
            if over_budget():
                result["reference"].append({"status": "skipped (budget)", "style": style, "autocast_bf16": autocast})
                continue
            r = attempt(f"reference {style}", lambda s=style, a=autocast: reference_run(
                gen, cfg, s, a, args.warmup, args.timed))
            if r.get("status") == "ok":
                r["seconds_per_image"] = r["engine_seconds_per_image"] + result["vqa_seconds_per_image"]["1"]
            r.setdefault("style", style)
            r.setdefault("autocast_bf16", autocast)
            result["reference"].append(r)
            print(f"reference {style} bf16={autocast}: {r.get('seconds_per_image', r.get('status'))}", flush=True)
            save()
    if args.early_exit and not over_budget():
        b, chunk = (best["batch"], best["view_chunk"]) if best else (batches[0], 0)
        iters = 8 if args.dry_run and args.early_exit_iterations == 20 else args.early_exit_iterations
        every = 2 if args.dry_run and args.early_exit_every == 5 else args.early_exit_every
        r = attempt("early exit", lambda: early_exit_run(gen, cfg, scorer, b, chunk, iters, every, 2 * b))
        result["early_exit_run"] = r
        if r.get("status") == "ok":
            print(f"early exit b={b}: {r['no_exit']['seconds_per_sample']:.2f} -> "
                  f"{r['early_exit']['seconds_per_sample']:.2f} s/sample ({r['seconds_ratio']:.2f}x; iterations "
                  f"{r['iteration_ratio']:.2f}x), monitor overhead {r['monitor_overhead_no_exit']:.1%}", flush=True)
        else:
            print(f"early exit: {r.get('status')} {r.get('error', '')[:200]}", flush=True)
        save()
    if best and args.profile and over_budget(best["batch"]):
        result["profile_eager"] = {"status": "skipped (budget)"}
    elif best and args.profile:
        r = attempt("profile eager", lambda: profile_steps(gen, cfg, best["batch"], best["view_chunk"],
                                                            args.profile_steps), units=best["batch"])
        result["profile_eager"] = r
        print("profile eager: " + _describe_profile(r), flush=True)
        save()
    # Last: engine.compile patches the shared ViT's blocks for good; cast_weights casts the shared weights.
    if best and args.compile and over_budget(3 * best["batch"]):  # compilation: ~3 runs' time (a guess)
        result["compile_run"] = {"status": "skipped (budget)"}
    elif best and args.compile:
        c2 = copy.deepcopy(cfg)
        c2.engine.compile = True
        r = attempt("compile", lambda: engine_config(gen, c2, best["batch"], best["view_chunk"], args.warmup,
                                                     args.timed, False, sf, vqa_s), units=3 * best["batch"])
        result["compile_run"] = r
        print("compile: " + _describe(r), flush=True)
        save()
        if args.profile and r.get("status") == "ok" and not over_budget(best["batch"]):
            p = attempt("profile compiled", lambda: profile_steps(gen, cfg, best["batch"], best["view_chunk"],
                                                                   args.profile_steps, compile_=True),
                        units=best["batch"])
            result["profile_compiled"] = p
            print("profile compiled: " + _describe_profile(p), flush=True)
            save()
    if best and args.bf16_weights and over_budget(best["batch"]):
        result["bf16_weights_run"] = {"status": "skipped (budget)"}
    elif best and args.bf16_weights:
        c3 = copy.deepcopy(cfg)
        c3.engine.cast_weights, c3.engine.compile = "bf16", args.compile
        if args.dry_run:
            c3.engine.autocast = "bf16"
        r = attempt("bf16 weights", lambda: engine_config(gen, c3, best["batch"], best["view_chunk"], args.warmup,
                                                          args.timed, False, sf, vqa_s), units=best["batch"])
        result["bf16_weights_run"] = r
        print(f"bf16 weights{' + compile' if args.compile else ''}: " + _describe(r), flush=True)
        save()
    summarize(result)
    save()
    print(json.dumps(result.get("summary", {}), indent=1), flush=True)
    signal.signal(signal.SIGTERM, previous_handler)  # main() may run inside another program (the tests)
    return 0


def _describe(r: dict[str, Any]) -> str:
    chunk = r.get("view_chunk")
    chunk = f"auto ({r.get('final_view_chunk')})" if chunk == AUTO_CHUNK else chunk
    head = f"batch {r.get('batch')} view_chunk {chunk}: "
    if r.get("status") != "ok":
        return head + str(r.get("status")) + (f" ({r.get('error', '')[:120]})" if r.get("error") else "")
    mem = r["peak_gib"]["allocated"] if r.get("peak_gib") else float("nan")
    return head + (f"{r['seconds_per_image']:.2f} s/image, joint step {r['joint_step_seconds'] * 1e3:.0f} ms "
                   f"({r['joint_step_tflops']:.0f} TFLOP/s), peak {mem:.1f} GiB")


def _describe_profile(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return str(r.get("status")) + (f" ({r.get('error', '')[:120]})" if r.get("error") else "")
    parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in r["component_seconds_per_step"].items())
    busy = (f"; GPU busy {r['gpu_busy_share']:.0%}, {r['kernels_per_step']:.0f} kernels"
            if r.get("gpu_busy_share") else "")
    return f"joint step {r['joint_step_seconds'] * 1e3:.0f} ms ({r['clock']}): {parts}{busy}"


def summarize(result: dict[str, Any]) -> None:
    best, floor = result.get("best"), result["floor"]
    s: dict[str, Any] = {"floor_seconds_per_image": floor["seconds_per_image_nominal"],
                         "floor_seconds_per_image_measured_rate": floor["seconds_per_image_measured_rate"]}
    if best:
        s.update(best_batch=best["batch"], best_view_chunk=best["view_chunk"],
                 best_seconds_per_image=best["seconds_per_image"], best_engine_tflops=best["engine_tflops"],
                 times_floor=best["seconds_per_image"] / floor["seconds_per_image_nominal"],
                 within_2x_floor=best["seconds_per_image"] <= 2 * floor["seconds_per_image_nominal"])
    for key in ("compile_run", "bf16_weights_run"):
        r = result.get(key) or {}
        if r.get("status") == "ok":
            s[key.replace("_run", "_seconds_per_image")] = r["seconds_per_image"]
            s[key.replace("_run", "_times_floor")] = r["seconds_per_image"] / floor["seconds_per_image_nominal"]
    for key in ("profile_eager", "profile_compiled"):
        r = result.get(key) or {}
        if r.get("gpu_busy_share") is not None:
            s[f"{key}_gpu_busy_share"] = r["gpu_busy_share"]
    ee = result.get("early_exit_run") or {}
    if ee.get("status") == "ok":
        s.update(early_exit_seconds_ratio=ee["seconds_ratio"], early_exit_iteration_ratio=ee["iteration_ratio"],
                 monitor_overhead=ee["monitor_overhead_no_exit"])
    ref = [r for r in result["reference"] if r.get("status") == "ok"]
    if best:
        for r in ref:
            key = f"speedup_vs_reference_{r['style']}{'_bf16' if r['autocast_bf16'] else '_fp32'}"
            s[key] = r["seconds_per_image"] / best["seconds_per_image"]
    result["summary"] = s


if __name__ == "__main__":
    sys.exit(main())
