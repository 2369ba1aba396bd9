"""Ray Train wiring of the finetune: a TorchTrainer whose workers run pipeline.finetune.train.train_worker.

Ray Train 2.60 (Train V2) sets up the torch process group (gloo on CPU, NCCL on GPU); every worker reports
each checkpoint (``ray.train.report`` is a barrier: all workers reach it at the same steps, which the
fixed step count guarantees), rank 0 with the trainer state, every rank with its data position; Ray merges
them into one checkpoint under ``storage_path/name``. A rerun with the same storage path and name resumes from
the newest (``ray.train.get_checkpoint``). Rank 0 writes the final LoRA to the output (local or s3://).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.finetune.train import FinetuneSpec


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from pipeline.finetune.output import write_output
    from pipeline.finetune.train import base_model_name, train_worker

    spec: FinetuneSpec = config["spec"]
    device = ray.train.torch.get_device()

    def publish(step: int, folder: str, metrics: dict[str, Any]) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    t0 = time.perf_counter()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            loop = train_worker(spec, folder, publish, device)
    else:
        loop = train_worker(spec, None, publish, device)
    ctx = ray.train.get_context()
    if ctx.get_world_rank() == 0:
        cfg = spec.cfg
        write_output(config["output"], cfg, base_model_name(cfg), spec.runs, loop, ctx.get_world_size(),
                     time.perf_counter() - t0, str(device))


def fit(spec: FinetuneSpec, output: str, num_workers: int, use_gpu: bool, storage_path: str, name: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"spec": spec, "output": output},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            storage_path=storage_path, name=name, failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.cfg.finetune.checkpoints_kept),
        ),
    )
    return trainer.fit()
