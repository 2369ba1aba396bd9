"""The Ray actor: loads the frozen model set once, then processes one shard per call.

Thin on purpose: all the work is ``pipeline.process_shard.ShardProcessor``, which runs without Ray.
"""

from __future__ import annotations

import os
import random
from typing import Any

import ray

# Debug hooks for fault tests, off unless set: "SHARD:N" makes the first N attempts at SHARD
# kill the actor's process (KILL) or raise (RAISE) midway; "P:SEED" kills the actor after a
# batch with probability P (the soak benchmark's random faults).
KILL_ENV = "REFEREE_SYNTH_KILL_ACTOR_ON_SHARD"
RAISE_ENV = "REFEREE_SYNTH_RAISE_ON_SHARD"
RANDOM_KILL_ENV = "REFEREE_SYNTH_RANDOM_KILL"
# "SHARD:PATH": at SHARD's first progress report, create PATH.waiting and wait (at most 120 s) until PATH
# exists, so a test can act (e.g. take the run lease over) while the shard is held before its publish.
# "SHARD/N:PATH": the same from its Nth progress report on (e.g. once a cascade's second stage has begun).
PAUSE_ENV = "REFEREE_SYNTH_PAUSE_SHARD"
_PAUSE_LIMIT_S = 120.0


def _hook_fires(env: str, shard: int, attempt: int) -> bool:
    spec = os.environ.get(env, "")
    if not spec:
        return False
    target, _, times = spec.partition(":")
    return int(target) == shard and attempt < int(times or 1)


def _random_kill_fires(shard: int, attempt: int, batch: int) -> bool:
    spec = os.environ.get(RANDOM_KILL_ENV, "")
    if not spec:
        return False
    prob, _, seed = spec.partition(":")
    # The actor's pid varies the draws between reruns, so no shard is doomed to die every time.
    draw = random.Random(f"{seed}:{os.getpid()}:{shard}:{attempt}:{batch}").random()
    return draw < float(prob)


def _maybe_pause(shard: int, report: int) -> None:
    import time
    from pathlib import Path

    target, _, path = os.environ.get(PAUSE_ENV, "").partition(":")
    target, _, nth = target.partition("/")
    if not path or int(target) != shard or report < int(nth or 1):
        return
    Path(f"{path}.waiting").touch()
    deadline = time.monotonic() + _PAUSE_LIMIT_S
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _model_processor(cfg: Any, model_ids: dict[str, str]) -> Any:
    import torch

    from pipeline.models.loading import load_generator_models
    from pipeline.process_shard import ShardProcessor

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(cfg.job.cpus_per_actor)))
    # Scorer models (BLIP-VQA, CLIP, OWLv2) load when a shard's category first needs them.
    return ShardProcessor(cfg, load_generator_models(cfg), None, model_ids)


class ShardWorker:
    def __init__(self, cfg_dict: dict[str, Any], output: str, model_ids: dict[str, str], progress: Any,
                 lease_token: str | None = None) -> None:
        from pipeline.config_loading import from_dict
        from pipeline.io.lease import LeaseFence
        from pipeline.io.storage import configure, filesystem_for
        from pipeline.noop_processor import NOOP_ENV, NoopProcessor

        cfg = from_dict(cfg_dict)
        configure(cfg.job)  # the run's object-store timeouts, as in the driver
        noop = os.environ.get(NOOP_ENV) == "1"
        self.processor = NoopProcessor(cfg, model_ids) if noop else _model_processor(cfg, model_ids)
        self.config_hash = cfg.hash()  # includes this node's library versions: the driver compares
        self.fs, self.out = filesystem_for(output)
        # Each shard's publishes check that the driver still holds the run folder (pipeline/io/lease.py).
        self.fence = LeaseFence.for_run(self.fs, self.out, lease_token) if lease_token else None
        self.progress = progress

    def ready(self) -> dict[str, Any]:
        """What the driver logs and checks: the resources Ray gave this actor and its config hash."""
        ctx = ray.get_runtime_context()
        return {"resources": ctx.get_assigned_resources(), "node": ctx.get_node_id()[:12],
                "config_hash": self.config_hash}

    def process(self, spec: Any, attempt: int) -> dict[str, Any]:
        batches = iter(range(1 << 30))

        def report(counts: dict[str, int]) -> None:
            batch = next(batches)
            if _hook_fires(KILL_ENV, spec.shard, attempt) or _random_kill_fires(spec.shard, attempt, batch):
                os._exit(1)  # simulate a crashed worker process mid-shard
            if _hook_fires(RAISE_ENV, spec.shard, attempt):
                raise RuntimeError(f"injected failure in shard {spec.shard}")
            _maybe_pause(spec.shard, batch + 1)
            if self.progress is not None:
                try:
                    self.progress.put_nowait((spec.shard, attempt, counts))
                except Exception:  # noqa: BLE001 - progress is best effort; the shard's files are what count
                    pass

        return self.processor.process(spec, self.fs, self.out, progress=report, fence=self.fence).to_dict()


def remote_worker_class(num_cpus: float, num_gpus: float, env_vars: dict[str, str]) -> Any:
    """The actor class with this run's resources; failures are retried by the driver, not by Ray."""
    return ray.remote(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0,
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )(ShardWorker)
