"""CPU benchmark of the inversion engine: batching against a per-prompt reference loop, and the
distributed job's overhead over the engine's own compute.

    python benchmarks/engine.py [--quick] [--json] [--models small|tiny] [--reps 2] [--out FILE]

(a) Throughput, all in this process and interleaved (rep 1: every variant, rep 2: every variant,
    ...) so a change of machine load hits every variant alike: the engine at batch 1, 2 and 4,
    and the reference loop of ``benchmarks/reference.py`` in its two styles ("authors": the
    authors' code's way, with its extra passes; "plain": Algorithm 1 one prompt at a time). Each
    variant is warmed up first on a 1-iteration run. Reported: images/s (best of the reps, and the
    median), the ratios, and the peak resident memory of each run (VmHWM, reset before it).
(b) Job overhead: ``jobs/synthesize.py`` as a subprocess on 16 prompts (1 actor with all the
    threads, so its engine computes as the in-process one), wall time from launch to exit, over
    the engine's own time inside that job (the sidecars' per-sample seconds: the engine's wall
    time per batch, shared out), with the job's accounting (summary.json, stats) splitting the
    rest into start-up (interpreter, Ray), pool (actor, model loading) and per-shard work
    (scoring, writing). Cross-check: the same 16 requests run by the engine in this process. Peak memory: the
    sum of the resident sizes of the job's process tree, sampled every 0.2 s.

``--quick``: the tiny models, one rep, the tiny preset's schedule. The default: the small set
(``configs/small.yaml``) with its short schedule for (a) and ``--job-iterations`` (40) referee
iterations for (b), where the job's fixed start-up cost is amortised as in a real run.
Models are built once into the model cache ($REFEREE_SYNTH_CACHE or ~/.cache/referee-synth).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.engine.invert import InversionEngine, SampleRequest, sample_seed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMPBENCH = ROOT / "data" / "t2i-compbench"
_FALLBACK_PROMPTS = [
    "a red car and a blue bird", "a green apple and a yellow banana", "a black cat and a white dog",
    "a brown leather chair and a glass table", "a pink cup and a purple book", "a round bowl and a square box",
    "a wooden table and a metallic chair", "an orange ball and a gray cube",
]
SPEEDUP_TARGET = 1.3
OVERHEAD_TARGET = 0.10


# ---- memory -------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


class TreeMemory:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread; also the CPU
    seconds each process had used when last seen (the shard worker's apart from the rest)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self.peak_worker_mb = 0.0
        self._cpu: dict[int, tuple[bool, float]] = {}  # pid -> (is the shard worker, CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total, worker = 0, 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        total += rss
                        # once the shard worker, always (Ray retitles its processes as they change role)
                        is_worker = "ShardWorker" in " ".join(p.cmdline()) or self._cpu.get(p.pid, (False,))[0]
                        if is_worker:
                            worker = max(worker, rss)
                        t = p.cpu_times()
                        self._cpu[p.pid] = (is_worker, t.user + t.system)
                    except psutil.Error:
                        continue
                self.peak_mb = max(self.peak_mb, total / 2**20)
                self.peak_worker_mb = max(self.peak_worker_mb, worker / 2**20)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> dict[str, float]:
        worker = sum(c for w, c in self._cpu.values() if w)
        return {"shard_worker": worker, "other_processes": sum(c for w, c in self._cpu.values() if not w)}


# ---- inputs -------------------------------------------------------------------------------------


def read_prompts(count: int) -> list[str]:
    prompts: list[str] = []
    for name in ("color_val", "shape_val", "texture_val"):
        path = COMPBENCH / f"{name}.txt"
        if path.is_file():
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = prompts or _FALLBACK_PROMPTS
    return [prompts[i % len(prompts)] for i in range(count)]


def requests_for(prompts: list[str], run_seed: int) -> list[SampleRequest]:
    """The requests the job makes for these rows (prompt_id = row number, sample 0)."""
    return [SampleRequest(p, str(i), 0, sample_seed(run_seed, str(i), 0)) for i, p in enumerate(prompts)]


def with_schedule(cfg: Config, iterations: int | None) -> Config:
    """A copy of ``cfg`` with ``iterations`` referee iterations (EMA restarts and warm-up scaled)."""
    cfg = copy.deepcopy(cfg)
    if iterations is None or iterations == cfg.optim.iterations:
        return cfg
    old = cfg.optim.iterations
    cfg.optim.ema_restarts = sorted({max(1, round(r * iterations / old)) for r in cfg.optim.ema_restarts})
    cfg.optim.warmup = min(cfg.optim.warmup, iterations)
    cfg.optim.iterations = iterations
    return cfg


def schedule_overrides(cfg: Config) -> list[str]:
    o = cfg.optim
    return [f"optim.iterations={o.iterations}", f"optim.tail_iterations={o.tail_iterations}",
            f"optim.warmup={o.warmup}", f"optim.ema_restarts={list(o.ema_restarts)}"]


# ---- (a) throughput ------------------------------------------------------------------------------


def make_runner(name: str, models: Any, cfg: Config) -> Callable[[list[SampleRequest]], Any]:
    from benchmarks.reference import ReferenceLoop

    if name.startswith("engine_b"):
        c = copy.deepcopy(cfg)
        c.engine.batch_size = int(name.removeprefix("engine_b"))
        c.engine.max_restarts = 0  # a random-weight model may diverge: keep every variant's work equal
        return InversionEngine(models, c).run
    style = name.removeprefix("reference_")
    return ReferenceLoop(models, cfg, style).run


VARIANTS = ("engine_b1", "engine_b2", "engine_b4", "reference_authors", "reference_plain")


def measure_throughput(models: Any, cfg: Config, prompts: list[str], reps: int, log: Callable[[str], None]) -> dict:
    reqs = requests_for(prompts, cfg.job.seed)
    warm_cfg = with_schedule(cfg, 1)
    warm_cfg.optim.tail_iterations = min(1, cfg.optim.tail_iterations)
    runners = {v: make_runner(v, models, cfg) for v in VARIANTS}
    for v in VARIANTS:  # warm-up: same shapes, one iteration (allocator, oneDNN primitives)
        batch = int(v.removeprefix("engine_b")) if v.startswith("engine_b") else 1
        make_runner(v, models, warm_cfg)(reqs[:batch])
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    absolute: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        for v in VARIANTS:
            base = rss_mb()
            reset_peak_rss()
            t0, c0 = time.perf_counter(), time.process_time()
            runners[v](reqs)
            dt = time.perf_counter() - t0
            times[v].append(dt)
            cpu[v].append(time.process_time() - c0)
            peak = peak_rss_mb()
            peaks[v].append(peak - base)
            absolute[v].append(peak)
            log(f"  rep {rep + 1}/{reps} {v:18s} {dt:8.2f} s ({cpu[v][-1]:7.2f} s CPU)  {len(reqs) / dt:7.3f} "
                f"images/s  peak RSS {peak:.0f} MB ({peaks[v][-1]:+.0f} MB)")
    # Best of the reps: on a shared machine a rep can only be slowed down by others, never sped up.
    ips = {v: len(reqs) / min(times[v]) for v in VARIANTS}
    return {
        "images": len(reqs),
        "seconds": times,
        "images_per_second": ips,
        "images_per_second_median": {v: len(reqs) / statistics.median(times[v]) for v in VARIANTS},
        # Process CPU time: robust to other processes on the machine when --threads 1 (no spinning).
        "cpu_seconds": cpu,
        "images_per_cpu_second": {v: len(reqs) / min(cpu[v]) for v in VARIANTS},
        "peak_rss_increase_mb": {v: max(p) for v, p in peaks.items()},
        "peak_rss_mb": {v: max(p) for v, p in absolute.items()},
        "speedup_vs_reference_authors": {v: ips[v] / ips["reference_authors"] for v in VARIANTS},
        "speedup_vs_reference_plain": {v: ips[v] / ips["reference_plain"] for v in VARIANTS},
        "cpu_speedup_vs_reference_authors": {v: min(cpu["reference_authors"]) / min(cpu[v]) for v in VARIANTS},
        "cpu_speedup_vs_reference_plain": {v: min(cpu["reference_plain"]) / min(cpu[v]) for v in VARIANTS},
    }


# ---- (b) job overhead ----------------------------------------------------------------------------


def run_job(cfg_path: Path, overrides: list[str], prompts: list[str], cache: str, threads: int,
            workdir: Path, log: Callable[[str], None], job_args: list[str]) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = workdir / "prompts.parquet"
    pq.write_table(pa.table({"prompt": prompts}), table)
    out = workdir / "run"
    cmd = [sys.executable, str(ROOT / "jobs" / "synthesize.py"), "--prompts", str(table), "--output", str(out),
           "--config", str(cfg_path), "--no-progress", "--num-actors", "1",
           "--set", f"job.cpus_per_actor={threads}", "--set", f"models.tiny_cache_dir={cache}", *job_args]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, REFEREE_SYNTH_CACHE=cache, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log(f"  job: {' '.join(cmd[1:4])} ... ({len(prompts)} prompts)")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(proc.pid) as mem:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the job failed (exit {proc.returncode}): {stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    sample_seconds = 0.0
    shard_seconds = 0.0
    for f in sorted((out / "shards").glob("*.parquet")):
        sample_seconds += sum(r["seconds"] or 0.0 for r in pq.read_table(f, columns=["seconds"]).to_pylist())
    for f in sorted((out / "shards").glob("*.stats.json")):
        shard_seconds += json.loads(f.read_text())["seconds"]
    return {
        "wall_seconds": wall,
        "summary_wall_seconds": summary["wall_seconds"],
        "engine_seconds_in_job": sample_seconds,
        "shard_seconds": shard_seconds,
        "samples": summary["samples"],
        "peak_tree_rss_mb": mem.peak_mb,
        "peak_worker_rss_mb": mem.peak_worker_mb,
        # CPU seconds of the job's processes when last sampled (up to 0.2 s before each ended):
        # what Ray's own processes take from the machine while the engine works.
        "cpu_seconds": mem.cpu_seconds(),
    }


def measure_overhead(models: Any, cfg: Config, cfg_path: Path, prompts: list[str], cache: str, threads: int,
                     log: Callable[[str], None], job_args: list[str]) -> dict:
    reqs = requests_for(prompts, cfg.job.seed)
    c = copy.deepcopy(cfg)
    c.engine.max_restarts = 0
    engine = InversionEngine(models, c)
    log(f"  engine directly: {len(reqs)} requests at batch {c.engine.batch_size}")
    base = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    engine.run(reqs)
    engine_seconds = time.perf_counter() - t0
    engine_peak = peak_rss_mb()
    log(f"  engine directly: {engine_seconds:.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        job = run_job(cfg_path, schedule_overrides(cfg), prompts, cache, threads, Path(tmp), log, job_args)
    log(f"  job: {job['wall_seconds']:.2f} s wall ({job['summary_wall_seconds']:.2f} s after Ray start; "
        f"{job['engine_seconds_in_job']:.2f} s in the engine)")
    wall = job["wall_seconds"]
    startup = wall - job["summary_wall_seconds"]  # interpreter, imports, planning, ray.init, shutdown
    pool = job["summary_wall_seconds"] - job["shard_seconds"]  # actor start, model loading, scheduling
    per_shard = job["shard_seconds"] - job["engine_seconds_in_job"]  # scoring, writing
    in_job = job["engine_seconds_in_job"]
    non_engine = wall - in_job
    return {
        "prompts": len(prompts),
        "iterations": cfg.optim.iterations,
        "tail_iterations": cfg.optim.tail_iterations,
        "engine_seconds": in_job,
        "engine_seconds_direct": engine_seconds,
        "engine_peak_rss_mb": engine_peak,
        "engine_peak_rss_increase_mb": engine_peak - base,
        "job": job,
        # Primary: the job's wall time over its own engine time (the sidecars' per-sample seconds),
        # measured in the same run; the direct in-process timing is a cross-check (a busy machine
        # can slow either run on its own).
        "overhead_ratio": wall / in_job,
        "overhead_fraction": wall / in_job - 1.0,
        "overhead_ratio_vs_direct_engine": wall / engine_seconds,
        "overhead_seconds": {"startup_and_shutdown": startup, "pool_and_model_loading": pool,
                             "scoring_and_writing": per_shard, "total": non_engine},
        # The same job with longer schedules, if its non-engine seconds stay put and the engine's
        # grow with the iteration count (an approximation: a tail iteration is cheaper than a joint one).
        "overhead_fraction_projected": {
            str(n): non_engine / (in_job * (n + cfg.optim.tail_iterations)
                                  / (cfg.optim.iterations + cfg.optim.tail_iterations))
            for n in (8, 40, 150)
        },
    }


# ---- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, one rep: a fast check")
    p.add_argument("--models", choices=["small", "tiny"], help="model set (default: small; tiny with --quick)")
    p.add_argument("--reps", type=int, help="timed reps per variant (default 3; 1 with --quick)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per throughput run (default 4)")
    p.add_argument("--job-prompts", type=int, default=16, help="prompts for the job overhead run (default 16)")
    p.add_argument("--job-iterations", type=int,
                   help="referee iterations for the overhead run (default 40; the preset's with --quick)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--cache", help="model cache folder (default: $REFEREE_SYNTH_CACHE or ~/.cache/referee-synth)")
    p.add_argument("--skip-job", action="store_true", help="throughput only")
    p.add_argument("--skip-throughput", action="store_true", help="job overhead only")
    p.add_argument("--job-no-dashboard", action="store_true", help="run the job with --no-dashboard")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    p.add_argument("--out", help="also write the JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models_name = args.models or ("tiny" if args.quick else "small")
    reps = args.reps or (1 if args.quick else 3)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.models.loading import load_generator_models
    from pipeline.models.tiny import default_cache_dir

    cache = args.cache or os.environ.get("REFEREE_SYNTH_CACHE") or str(default_cache_dir())

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    torch.set_num_threads(args.threads)
    cfg_path = preset_path(models_name)
    cfg = load_config(cfg_path, [f"models.tiny_cache_dir={cache}"])
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    log(f"{models_name} models, {args.threads} threads, cache {cache}")
    models = load_generator_models(cfg)
    result: dict[str, Any] = {
        "models": models_name, "config": str(cfg_path.relative_to(ROOT)), "threads": args.threads,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "reps": reps,
        "schedule": {"iterations": cfg.optim.iterations, "tail_iterations": cfg.optim.tail_iterations,
                     "num_views": cfg.augment.num_views, "latent_size": cfg.latent.size},
    }
    result["peak_memory_mb"] = {}
    if not args.skip_throughput:
        log(f"(a) throughput: {args.prompts} prompts, {reps} rep(s), variants {', '.join(VARIANTS)}")
        tp = measure_throughput(models, cfg, read_prompts(args.prompts), reps, log)
        result["throughput"] = tp
        result["batch4_speedup"] = tp["speedup_vs_reference_authors"]["engine_b4"]
        result["batch4_speedup_vs_plain_reference"] = tp["speedup_vs_reference_plain"]["engine_b4"]
        result["peak_memory_mb"].update(tp["peak_rss_mb"])
    if not args.skip_job:
        iters = args.job_iterations or (None if args.quick else 40)
        job_cfg = with_schedule(cfg, iters)
        log(f"(b) job overhead: {args.job_prompts} prompts, {job_cfg.optim.iterations}+"
            f"{job_cfg.optim.tail_iterations} iterations")
        job_args = ["--no-dashboard"] if args.job_no_dashboard else []
        ov = measure_overhead(models, job_cfg, cfg_path, read_prompts(args.job_prompts), cache, args.threads, log,
                              job_args)
        ov["job_args"] = job_args
        result["overhead"] = ov
        result["overhead_ratio"] = ov["overhead_ratio"]
        result["overhead_fraction"] = ov["overhead_fraction"]
        result["peak_memory_mb"]["engine_direct"] = ov["engine_peak_rss_mb"]
        result["peak_memory_mb"]["job_process_tree"] = ov["job"]["peak_tree_rss_mb"]
        result["peak_memory_mb"]["job_worker"] = ov["job"]["peak_worker_rss_mb"]
    result["targets"] = {
        # The targets are stated for the small set; the tiny models' work is too small to amortise
        # anything, so with them (--quick) the run checks the plumbing and prints the ratios only.
        "apply": models_name == "small",
        "batch4_speedup_min": SPEEDUP_TARGET,
        "batch4_speedup_met": result["batch4_speedup"] >= SPEEDUP_TARGET if "batch4_speedup" in result else None,
        "overhead_fraction_max": OVERHEAD_TARGET,
        "overhead_met": (result["overhead_fraction"] <= OVERHEAD_TARGET) if "overhead_fraction" in result else None,
    }
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    result["seconds"] = time.perf_counter() - t_start
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        print(text)
    else:
        log(format_report(result))
    return 0


def format_report(r: dict) -> str:
    lines = [""]
    if "throughput" in r:
        lines += _throughput_lines(r)
    if "overhead" in r:
        lines += _overhead_lines(r)
    la = r["load_average"]
    lines.append(f"load average before/after: {la['before'][0]:.2f}/{la['after'][0]:.2f} on {r['cpu_count']} cores")
    return "\n".join(lines)


def _verdict(met: bool, applies: bool) -> str:
    if not applies:
        return "applies to the small set, not these models"
    return "met" if met else "NOT met"


def _throughput_lines(r: dict) -> list[str]:
    tp, t = r["throughput"], r["targets"]
    lines = [f"{'variant':20s} {'images/s':>10s} {'vs authors ref':>15s} {'vs plain ref':>13s} "
             f"{'CPU-time vs authors/plain':>26s} {'peak RSS MB':>12s} {'(increase)':>11s}"]
    for v in VARIANTS:
        lines.append(f"{v:20s} {tp['images_per_second'][v]:10.3f} {tp['speedup_vs_reference_authors'][v]:14.2f}x "
                     f"{tp['speedup_vs_reference_plain'][v]:12.2f}x "
                     f"{tp['cpu_speedup_vs_reference_authors'][v]:17.2f}x/{tp['cpu_speedup_vs_reference_plain'][v]:.2f}x"
                     f" {tp['peak_rss_mb'][v]:12.0f} {tp['peak_rss_increase_mb'][v]:+10.0f}")
    lines.append(f"batch-4 speedup over the reference loop: {r['batch4_speedup']:.2f}x "
                 f"(target >= {t['batch4_speedup_min']}x: {_verdict(t['batch4_speedup_met'], t['apply'])})")
    return lines


def _overhead_lines(r: dict) -> list[str]:
    ov, t = r["overhead"], r["targets"]
    s = ov["overhead_seconds"]
    return [
        f"job on {ov['prompts']} prompts ({ov['iterations']}+{ov['tail_iterations']} iterations): "
        f"{ov['job']['wall_seconds']:.1f} s wall vs {ov['engine_seconds']:.1f} s in its engine -> "
        f"overhead {100 * ov['overhead_fraction']:.1f}% (target <= {100 * t['overhead_fraction_max']:.0f}%: "
        f"{_verdict(t['overhead_met'], t['apply'])}); the engine run directly here: "
        f"{ov['engine_seconds_direct']:.1f} s (wall / that = {ov['overhead_ratio_vs_direct_engine']:.3f})",
        f"  overhead seconds: start-up/shutdown {s['startup_and_shutdown']:.1f}, pool and model loading "
        f"{s['pool_and_model_loading']:.1f}, scoring and writing {s['scoring_and_writing']:.1f}; CPU seconds: "
        f"shard worker {ov['job']['cpu_seconds']['shard_worker']:.0f}, the job's other processes "
        f"{ov['job']['cpu_seconds']['other_processes']:.0f}",
        f"  peak memory: job process tree {ov['job']['peak_tree_rss_mb']:.0f} MB (worker "
        f"{ov['job']['peak_worker_rss_mb']:.0f} MB); engine in this process "
        f"{ov['engine_peak_rss_mb']:.0f} MB ({ov['engine_peak_rss_increase_mb']:+.0f} MB)",
        "  projected overhead at " + ", ".join(f"{k} iterations: {100 * v:.1f}%"
                                              for k, v in ov["overhead_fraction_projected"].items()),
    ]


if __name__ == "__main__":
    sys.exit(main())
