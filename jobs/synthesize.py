"""The main job: prompts (Parquet) in, WebDataset shards of accepted (image, caption, score) out.

    python jobs/synthesize.py --prompts PATH --output PATH [--config FILE] [--set k=v ...]
        [--num-actors N] [--shard-size N] [--samples-per-prompt K] [--seed S] [--threshold X] [--force]
        [--no-progress] [--no-dashboard] [--target-accepted K --max-samples M] [--gpu-hour-price P]
        [--generator inversion|sd_sampling|cascade]
    python jobs/synthesize.py --plan --prompts PATH --output PATH [--from-run RUN_DIR ...] [same options]

On a cluster: ``ray job submit --working-dir . -- python jobs/synthesize.py ...`` (or with
RAY_ADDRESS set). Otherwise a local Ray starts, its dashboard (unless --no-dashboard) bound to 127.0.0.1.
``--target-accepted K``: per prompt, samples until K are accepted or M (``--max-samples``) were tried
(in-shard refill, pipeline/budget/refill.py). ``--plan``: no Ray, no models, no torch: prints and writes
OUT/plan.json (expected samples, accepted images, GPU-hours), from ``--from-run``'s rates or the FLOP floor
(several --from-run: grouped by generator, each generator's GPU-hours for the same target side by side);
the run folder gets nothing else (no run.json, no lease).
Shards go to each actor as soon as it is ready; no actor ready after ``job.actor_ready_timeout_s``
is one line naming the missing resources, exit 1.
Exit codes: 0 every planned shard complete; 1 some shards failed after retries or are incomplete, no actor
could start for lack of resources, the run lease was taken over, or the run's files could not be written
(rerun to resume); 2 usage, configuration or input-file error; 130 interrupted (docs/ARCHITECTURE.md,
"Fault model").
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import EXIT_FAILED, EXIT_OK, fail, run_main  # noqa: E402
from pipeline.config import CASCADE, ENGINE_GENERATORS, MODEL_KEYS, Config, prompt_attempt_limit  # noqa: E402
from pipeline.config_loading import load_config  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.models.lora_files import resolve_lora  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Environment the actors need to see as the driver does (debug hooks, model cache, hub settings).
_FORWARDED_ENV_PREFIXES = ("REFEREE_SYNTH_", "HF_", "TRANSFORMERS_", "AWS_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthesize.py", description=__doc__.split("\n")[0])
    p.add_argument("--prompts", required=True, help="Parquet file or folder (local, s3://, gs://)")
    p.add_argument("--output", required=True, help="run folder (local, s3://, gs://)")
    p.add_argument("--config", action="append", help="YAML preset, e.g. configs/paper.yaml or configs/tiny.yaml; "
                   "repeat to layer presets (later ones win key by key), e.g. tiny.yaml then zoo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--num-actors", type=int,
                   help="actors in the pool (required on a cluster; a local Ray defaults to one per GPU)")
    p.add_argument("--shard-size", type=int, help="prompt rows per shard")
    p.add_argument("--samples-per-prompt", type=int, help="images per prompt (rows may override)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--threshold", type=float, help="acceptance threshold for every category")
    p.add_argument("--generator", choices=ENGINE_GENERATORS,
                   help="what makes the images: inversion (default), sd_sampling (plain SD 1.5 sampling) or cascade "
                        "(cascade.stages in turn per prompt, with --target-accepted; docs/CASCADE.md); "
                        "the same as --set engine.generator=...")
    p.add_argument("--lora", metavar="DIR", help="with --generator sd_sampling: a LoRA from `referee-synth finetune` "
                   "(the same as --set sampling.lora=DIR)")
    p.add_argument("--target-accepted", type=int, metavar="K",
                   help="accepted images wanted per prompt: keep sampling until K are accepted (or --max-samples)")
    p.add_argument("--max-samples", type=int, metavar="M", help="with --target-accepted: attempts per prompt at most")
    p.add_argument("--gpu-hour-price", type=float, metavar="P", help="price of a device-hour: cost per accepted image")
    p.add_argument("--plan", action="store_true", help="estimate samples, accepted images and GPU-hours; run nothing")
    p.add_argument("--from-run", metavar="RUN_DIR", action="append",
                   help="with --plan: an earlier run's acceptance rates and seconds; repeat it with a run of each "
                        "generator to compare their GPU-hours for the same target")
    p.add_argument("--force", action="store_true", help="redo every shard of a run whose config changed")
    p.add_argument("--redo-changed", action="store_true",
                   help="on a grown table: redo the shards holding prompts edited since their samples were made")
    p.add_argument("--drop-removed", action="store_true",
                   help="on a grown table: retire prompts no longer in it from shards.txt, the card and the exports "
                        "(their files stay)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-dashboard", action="store_true",
                   help="local Ray only: start it without the dashboard (about 2 s faster, ~0.9 GB less memory)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    sets = list(args.set)
    flags = {
        "job.num_actors": args.num_actors, "job.shard_size": args.shard_size,
        "job.samples_per_prompt": args.samples_per_prompt, "job.seed": args.seed,
        "job.target_accepted": args.target_accepted, "job.max_samples_per_prompt": args.max_samples,
        "cost.gpu_hour_price": args.gpu_hour_price, "engine.generator": args.generator,
        "sampling.lora": args.lora,
    }
    sets += [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.threshold is not None:
        if not math.isfinite(args.threshold):  # NaN would pass no score and fail no range check
            raise UserError(f"--threshold must be a finite number, got {args.threshold}")
        sets += [f"filter.default_threshold={args.threshold}", "filter.thresholds={}", "filter.inferred={}"]
    cfg = resolve_lora(load_config(args.config, sets))
    if args.max_samples is not None and not cfg.job.target_accepted:
        print("warning: --max-samples has no effect without --target-accepted (job.target_accepted is 0): "
              "each prompt makes exactly --samples-per-prompt samples", file=sys.stderr)
    return cfg


def _forwarded_env(local: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
    if local:  # on a cluster, `ray job submit --working-dir` puts the project on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def start_ray(dashboard: bool = True) -> bool:
    """Connect to a cluster if one is given, else start a local one. Returns True if we started it."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    # address="local": a fresh embedded Ray, never a cluster that `ray start` left running here.
    ray.init(
        address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
        runtime_env={"env_vars": _forwarded_env(local=True)},
    )
    return True


def _pool_size(cfg: Config, local: bool, shards: int) -> tuple[int, float]:
    """(actors, GPUs per actor) from the config. Never from what a cluster has at start: an autoscaler
    adds GPU nodes only for actors that ask for GPUs. A local Ray's resources are the machine's own,
    so there a GPU-less machine falls back to CPU actors and num_actors 0 means one per local GPU.
    Never more actors than ``shards`` to do: an actor without a shard would only load the models (a resumed
    run, a short night)."""
    n, per = _configured_pool_size(cfg, local)
    return min(n, max(1, shards)), per


def _configured_pool_size(cfg: Config, local: bool) -> tuple[int, float]:
    import ray

    per, n = cfg.job.gpus_per_actor, cfg.job.num_actors
    if not local:
        if not n:
            raise UserError("job.num_actors is 0: on a cluster set --num-actors N (the job does not guess it from "
                            "the nodes up at start; an autoscaler adds GPU nodes for the actors that ask)")
        return n, per
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus == 0 or per == 0:
        cpus = ray.cluster_resources().get("CPU", 1)
        return n or max(1, min(2, int(cpus // max(cfg.job.cpus_per_actor, 1e-3)))), 0.0
    return n or max(1, int(gpus // per)), per


def metrics_tag(output: str) -> str:
    """The run's output as a metrics tag value: Ray's metrics agent encodes tags as ASCII, so any other
    character is percent-encoded (an --output with a non-ASCII name must not kill the driver)."""
    from urllib.parse import quote

    return quote(output, safe="/:@~+=,{}._-")


class RunMetrics:
    """Prometheus metrics through ray.util.metrics, tagged with the run's output (Ray's metrics agent exports
    them with a ``ray_`` prefix, e.g. ``ray_referee_synth_samples_accepted_total``; see docs/CLUSTER.md)."""

    STATUSES = ("accepted", "rejected", "failed")

    def __init__(self, output: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": metrics_tag(output)}
        self.samples = {
            s: Counter(f"referee_synth_samples_{s}", description=f"{s} samples of complete shards", tag_keys=("run",))
            for s in self.STATUSES
        }
        self.rate = Gauge("referee_synth_images_per_hour", description="images made per hour in this run",
                          tag_keys=("run",))

    def shard_done(self, stats: dict[str, Any]) -> None:
        """Counted per complete shard (not from live progress), so a retried shard is never counted twice."""
        for s in self.STATUSES:
            if stats.get(s, 0) > 0:
                self.samples[s].inc(stats[s], tags=self.tags)

    def set_rate(self, images_per_hour: float) -> None:
        self.rate.set(images_per_hour, tags=self.tags)


def check_placement(cfg: Config, local: bool, shards: int) -> None:
    """Actors this Ray can never place would wait forever: refuse on a local Ray (fixed size), say so
    on a cluster (an autoscaler may add nodes)."""
    import ray

    n, gpus = _pool_size(cfg, local, shards)
    total = ray.cluster_resources()
    need = {"CPU": n * cfg.job.cpus_per_actor, "GPU": n * gpus}
    short = [f"{need[k]:g} {k} (has {total.get(k, 0):g})" for k in need if need[k] > total.get(k, 0) + 1e-9]
    if not short:
        return
    what = f"{n} actors need {' and '.join(short)}"
    if local:
        raise UserError(f"{what} on this machine's Ray; lower --num-actors or job.cpus_per_actor/gpus_per_actor")
    print(f"warning: {what} on the cluster now: they start only if the cluster grows (Ctrl-C to stop)",
          file=sys.stderr)


class Progress:
    """tqdm over samples with accepted / rejected / failed counts and images per hour."""

    def __init__(self, total: int, done: int, disable: bool) -> None:
        from tqdm import tqdm

        self.counts = {"accepted": 0, "rejected": 0, "failed": 0, "invalid_input": 0}
        self.t0 = time.time()
        self.bar = tqdm(total=total, initial=done, unit="sample", disable=disable, dynamic_ncols=True)

    def update(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.bar.update(sum(counts.values()))
        self.bar.set_postfix(acc=self.counts["accepted"], rej=self.counts["rejected"],
                             fail=self.counts["failed"], img_h=f"{self.images_per_hour():.0f}")

    def images_per_hour(self) -> float:
        made = self.counts["accepted"] + self.counts["rejected"] + self.counts["failed"]
        return 3600 * made / max(time.time() - self.t0, 1e-6)

    def close(self) -> None:
        self.bar.close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.plan:
        return plan_only(args, cfg)
    if cfg.cascade.auto:
        _choose_auto_stages(args, cfg)
    elif args.from_run:
        raise UserError("--from-run goes with --plan (or with cascade.stages: auto)")
    plan = _plan(args, cfg)
    try:
        return _run(args, cfg, plan)
    finally:
        plan["lease"].release()


def _run(args: argparse.Namespace, cfg: Config, plan: dict[str, Any]) -> int:
    """Process the planned shards on Ray (the caller holds the run folder's lease)."""
    if not plan["todo"]:
        return _finish_held(plan, cfg, failed={}, retries=0, wall=0.0)
    import ray

    from pipeline.io.lease import LeaseLost

    local = not os.environ.get("RAY_ADDRESS")
    started = start_ray(dashboard=not args.no_dashboard)
    # After ray.init, which installs its own SIGTERM handler: ours stops the actors cleanly.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    pool = None
    t0 = time.time()
    try:
        shards = len(plan["todo"])
        check_placement(cfg, local, shards)
        lease = plan["lease"]
        pool, request = _make_pool(cfg, args.output, plan["model_ids"], plan["info"].config_hash, local,
                                   lease.me.token, shards)
        progress = Progress(plan["total_samples"], plan["done_samples"], args.no_progress)
        result = _run_pool(pool, request, plan["todo"], progress, RunMetrics(args.output), lease.ensure_held)
        progress.close()
        return _finish_held(plan, cfg, failed=result.failed, retries=result.retries, wall=time.time() - t0)
    except NoActorsError as err:
        return fail(str(err), EXIT_FAILED)
    except LeaseLost as err:  # another driver owns the folder now: stop at once, write nothing more
        return fail(f"{err}; the other driver's run decides what the folder holds", EXIT_FAILED)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: completed shards are kept; rerun the same command to resume ({args.output})",
            file=sys.stderr,
        )
        return 130
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()


def _scorer_record(cfg: Config, model_ids: dict[str, str]) -> dict[str, Any]:
    """The scorer's exactness record; says when spaCy is not the pinned version (real models only)."""
    from pipeline.scoring.filter import selection_record
    from pipeline.scoring.routing import planned_records
    from pipeline.scoring.scorer_record import model_set, planned_record, spacy_warning

    record = planned_record(cfg, model_ids["vqa"])
    warning = spacy_warning({"name": record["spacy_model"], "version": record["spacy_version"]},
                            cfg.vqa.spacy_version)
    if warning and not model_set(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    # Every scorer the config can route to, with its exactness (the BLIP-VQA record above is blip_vqa's).
    names = {*cfg.scoring.by_category.values(), cfg.scoring.default}
    record["by_category"] = {**cfg.scoring.by_category, "default": cfg.scoring.default}
    record["scorers"] = planned_records(cfg, record, names)
    record["selection"] = selection_record(cfg.filter)
    return record


def _location(uri: str) -> str:
    """A comparable form of a path or URI: absolute local path, or scheme://bucket/key."""
    if "://" in uri:
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_paths(prompts: str, output: str) -> None:
    """Refuse empty paths and a run folder that overlaps its input (the run would read itself back)."""
    for flag, value in (("--prompts", prompts), ("--output", output)):
        if not value.strip():
            raise UserError(f"{flag} is empty; give a path")
    src, dst = _location(prompts), _location(output)
    if _inside(dst, src):
        raise UserError(f"--output {output} is inside --prompts {prompts}; the run would be read back as prompts")
    if _inside(src, dst):
        raise UserError(f"--prompts {prompts} is inside --output {output}; keep inputs out of the run folder")


def _plan(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from pipeline.io import storage
    from pipeline.io.prompt_files import fingerprint, read_prompt_tables
    from pipeline.scoring.scorer_record import check_vqa_source
    from schemas.prompts import validate_rows

    check_paths(args.prompts, args.output)
    storage.configure(cfg.job)
    # Input checks first and with light imports, so a bad file is reported in about a second.
    files, tables = read_prompt_tables(args.prompts)
    rows = validate_rows(tables, cfg.job.samples_per_prompt, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars,
                         prompt_attempt_limit(cfg) if cfg.job.target_accepted else 0)
    if not rows:
        raise UserError(f"prompts: {args.prompts}: no prompt rows")
    from pipeline.scoring.routing import models_needed, scorers_for

    if "vqa" in models_needed(scorers_for({r.category for r in rows}, cfg.scoring)):
        check_vqa_source(cfg)  # before any run folder, actor or GPU work: a missing converted checkpoint is one line
    _warn_zoo_coverage(cfg, rows)

    from pipeline.io.lease import RunLease
    from pipeline.io.nightly import NightOptions, start_night
    from pipeline.io.run_folder import make_run_info, remove_leftovers
    from pipeline.io.storage import filesystem_for
    from schemas.prompts import default_id_count

    model_ids = _model_ids(cfg)
    scorer = _scorer_record(cfg, model_ids)
    fs, out = filesystem_for(args.output)
    info = make_run_info(cfg, model_ids, fingerprint(files, tables), args.prompts, 0, scorer)
    lease = RunLease(fs, out, args.output, cfg.job.lease_heartbeat_s, cfg.job.lease_stale_s)
    try:
        # Before anything in the folder changes: one driver per output, --force included.
        lease.acquire()
        night, todo = start_night(fs, out, info, rows, args.force, NightOptions(args.redo_changed, args.drop_removed),
                                  args.output, default_id_count(tables))
        remove_leftovers(fs, out)
    except OSError as err:
        lease.release()
        raise UserError(f"output {args.output}: cannot write ({str(err).splitlines()[0]})") from None
    except BaseException:
        lease.release()
        raise
    specs = night.specs
    done = {s.shard for s in specs} - {s.shard for s in todo}
    total = sum(_expected_samples(r, cfg) for r in rows)
    done_samples = sum(_expected_samples(r, cfg) for s in specs if s.shard in done for r in s.rows)
    if done:
        print(f"resuming: {len(done)} of {len(specs)} shards already complete", file=sys.stderr)
    return dict(fs=fs, out=out, specs=specs, todo=todo, model_ids=model_ids, rows=rows, info=info,
                output_uri=args.output, total_samples=total, done_samples=done_samples, skipped=len(done),
                scorer=scorer, lease=lease, night=night)


def _choose_auto_stages(args: argparse.Namespace, cfg: Config) -> None:
    """cascade.stages auto: the stage-1 budget per category from --from-run's rates, as --plan chooses it,
    recorded in the config (cascade.first_stage_by_category: part of the run's hash)."""
    from pipeline.budget.accounting import NO_CATEGORY
    from pipeline.budget.cascade_plan import choose_auto
    from pipeline.budget.run_plan import rates_by_generator
    from pipeline.io.prompt_files import read_prompt_tables
    from schemas.prompts import validate_rows

    _, tables = read_prompt_tables(args.prompts)
    rows = validate_rows(tables, cfg.job.samples_per_prompt, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars,
                         prompt_attempt_limit(cfg))
    if not args.from_run:
        print("warning: cascade.stages auto without --from-run: both generators' acceptance is assumed equal "
              "(cost.plan_acceptance_rate), so sampling gets its whole budget", file=sys.stderr)
    chosen = choose_auto(cfg, rows, rates_by_generator(args.from_run or []))
    cfg.cascade.first_stage_by_category = {("" if k == NO_CATEGORY else k): v for k, v in chosen.items()}
    print("cascade auto: stage-1 budget per category " + ", ".join(f"{k}: {v}" for k, v in chosen.items()),
          file=sys.stderr)


def _warn_zoo_coverage(cfg: Config, rows: list[Any]) -> None:
    from collections import Counter

    from pipeline.referees.registry import coverage_warnings

    if cfg.zoo.referees and cfg.engine.generator == "inversion":
        counts = Counter(r.category for r in rows if r.status == "ok")
        for line in coverage_warnings(cfg.zoo.referees, dict(counts)):
            print(f"warning: {line}", file=sys.stderr)


def plan_only(args: argparse.Namespace, cfg: Config) -> int:
    """--plan: estimate the run from the prompts and rates; write OUT/plan.json and nothing else."""
    import json

    from pipeline.budget.run_plan import (
        compare_generators,
        exit_fractions,
        format_plan,
        make_plan,
        rates_by_generator,
        rates_from_floor,
        with_cascade,
    )
    from pipeline.io import storage
    from pipeline.io.nightly import pending_work
    from pipeline.io.prompt_files import read_prompt_tables
    from pipeline.io.shards import plan_shards
    from schemas.prompts import validate_rows

    _, tables = read_prompt_tables(args.prompts)
    rows = validate_rows(tables, cfg.job.samples_per_prompt, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars,
                         prompt_attempt_limit(cfg) if cfg.job.target_accepted else 0)
    if not rows:
        raise UserError(f"prompts: {args.prompts}: no prompt rows")
    by_generator = rates_by_generator(args.from_run or [])
    rates = by_generator.get(cfg.engine.generator) or rates_from_floor(cfg, rows, exit_fractions(args.from_run or []))
    shards = len(plan_shards(rows, cfg.job.shard_size))
    pending = pending_work(*storage.filesystem_for(args.output), rows, cfg.job.shard_size)
    if pending is not None:  # a grown table on a placed folder: estimate tonight's work only
        print(f"{args.output}: {len(rows) - len(pending[0])} of these {len(rows)} prompts need nothing more there; "
              "the plan covers the others (new ones, and the shards --redo-changed would redo)", file=sys.stderr)
        rows, shards = pending
    result = make_plan(rows, shards, cfg, rates)
    if cfg.engine.generator == "cascade":
        result = with_cascade(result, cfg, rows, by_generator)
    if by_generator:
        result["generators"] = compare_generators(rows, shards, cfg, by_generator)
    fs, out = storage.filesystem_for(args.output)
    try:
        fs.create_dir(out, recursive=True)
        storage.write_atomic(fs, storage.join(out, "plan.json"), json.dumps(result, indent=1).encode())
    except OSError as err:
        raise UserError(f"output {args.output}: cannot write ({str(err).splitlines()[0]})") from None
    print(format_plan(result))
    print(f"wrote {storage.join(args.output, 'plan.json')}")
    return EXIT_OK


def _expected_samples(row: Any, cfg: Config) -> int:
    """Progress total: with a target, K per valid prompt (the least it makes; refills add to the bar)."""
    from schemas.prompts import STATUS_OK, samples_of

    if cfg.job.target_accepted and row.status == STATUS_OK:
        return cfg.job.target_accepted
    return samples_of(row)


def _model_ids(cfg: Config) -> dict[str, str]:
    """What the run folder records as its models. Names only: the driver loads nothing (no torch
    import, seconds saved per job); the actors resolve, build (tiny, small) and load them."""
    m = cfg.models
    if m.tiny or m.small:  # local cache paths differ per machine; name the set instead
        from pipeline.models.tiny import SMALL_LAYOUT_VERSION, TINY_LAYOUT_VERSION

        layout = TINY_LAYOUT_VERSION if m.tiny else SMALL_LAYOUT_VERSION
        ids = {k: f"{layout}-seed{m.tiny_seed}/{k}" for k in MODEL_KEYS}
        zoo = {f"referee:{name}": f"{layout}-seed{m.tiny_seed}/{kind}" for name, kind, _ in _zoo_models(cfg)}
        return ids | zoo | _lora_id(cfg)
    ids = {k: f"{getattr(m, k)}@{m.revision}" for k in MODEL_KEYS}
    return ids | {f"referee:{name}": f"{model}@{m.revision}" for name, _, model in _zoo_models(cfg)} | _lora_id(cfg)


def _lora_id(cfg: Config) -> dict[str, str]:
    """sampling.lora, in every sample's model_ids (its weights' digest is in the config hash too)."""
    if not cfg.sampling.lora:
        return {}
    from pipeline.models.lora_files import lora_label

    return {"lora": lora_label(cfg.sampling.lora)}


def _zoo_models(cfg: Config) -> list[tuple[str, str, str]]:
    """(name, kind, model id) of each zoo referee with a model of its own (BLIP-2's is models.referee)."""
    from pipeline.referees.registry import REFEREE_KINDS

    return [(s.name or s.kind, s.kind, s.model or REFEREE_KINDS[s.kind].default_model)
            for s in cfg.zoo.referees if s.kind != "blip2"]


def _make_pool(cfg: Config, output: str, model_ids: dict[str, str], config_hash: str, local: bool, lease_token: str,
               shards: int):
    """The pool (actors start now, asynchronously) and the resources each actor asks for."""
    from actors.pool import ShardPool
    from actors.shard_worker import remote_worker_class

    n, gpus = _pool_size(cfg, local, shards)
    env = {} if local else _forwarded_env(local=False)
    worker = remote_worker_class(cfg.job.cpus_per_actor, gpus, env)
    cfg_dict = cfg.to_dict()
    events = _ActorEvents(config_hash)
    pool = ShardPool(lambda q: worker.remote(cfg_dict, output, model_ids, q, lease_token), n, cfg.job.max_shard_retries,
                     cfg.job.actor_ready_timeout_s, events)
    return pool, {"CPU": cfg.job.cpus_per_actor, "GPU": gpus}


class _ActorEvents:
    """Says when actors become ready (with the resources Ray gave them); refuses an actor whose library
    versions, hence config hash, differ from the driver's (its shards would never count as complete)."""

    def __init__(self, config_hash: str) -> None:
        self.config_hash = config_hash

    def __call__(self, event: str, d: dict[str, Any]) -> None:
        if event == "fewer":
            print(f"warning: only {d['ready']} of {d['size']} actors ready; going on with them "
                  "(the others start when their resources appear)", file=sys.stderr)
            return
        info = d["info"]
        if info["config_hash"] != self.config_hash:
            raise UserError(f"an actor on node {info['node']} computes config hash {info['config_hash']}, the driver "
                            f"{self.config_hash}: install the same library versions on every node")
        if d["ready"] in (1, d["size"]):
            have = ", ".join(f"{k} {v:g}" for k, v in sorted(info["resources"].items()))
            which = "first actor" if d["ready"] == 1 else f"all {d['size']} actors"
            print(f"{which} ready after {d['seconds']:.1f} s (each has {have or 'no resources'})", file=sys.stderr)


def _run_pool(pool: Any, request: dict[str, float], todo: list[Any], progress: Progress, metrics: RunMetrics,
              check: Any = None) -> Any:
    """Run the shards; an actor that cannot start is a user-facing one-line error."""
    from actors.pool import ActorStartError, NoActorReady, missing_resources

    def on_progress(counts: dict[str, int]) -> None:
        progress.update(counts)
        metrics.set_rate(progress.images_per_hour())

    try:
        return pool.run(todo, on_progress, metrics.shard_done, check)
    except ActorStartError as err:
        raise UserError(f"actors could not start: {_cause_line(err.cause)}") from None
    except NoActorReady as err:
        raise NoActorsError(f"{err}: {missing_resources(request)}") from None


class NoActorsError(UserError):
    """Exit 1, not 2: the request may be right and the cluster short (rerun when it has the resources)."""


def _cause_line(err: Exception) -> str:
    """The user-facing line of an actor constructor's error (e.g. a missing model)."""
    for line in reversed(str(err).splitlines()):
        for name in ("ModelLoadError: ", "ConfigError: ", "UserError: "):
            if name in line:
                return line.split(name, 1)[1].strip()
    lines = [t for t in str(err).splitlines() if t.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def _print_accounting(summary: Any) -> None:
    if summary.seconds_per_accepted is not None:
        cost = f", cost {summary.cost_per_accepted:.4f} per accepted image" if summary.cost_per_accepted else ""
        print(f"device time: {summary.device_hours:.4f} h, {summary.seconds_per_accepted:.2f} s per accepted image"
              f"{cost}", file=sys.stderr)
    if summary.target_accepted:
        print(f"target {summary.target_accepted} accepted per prompt: {summary.short_prompts_total} prompt(s) short "
              "(listed per category in summary.json)", file=sys.stderr)


def _finish_held(plan: dict[str, Any], cfg: Config, failed: dict[int, str], retries: int, wall: float) -> int:
    """The run's own files, only while this driver still holds the folder; a lost lease is exit 1."""
    from pipeline.io.lease import LeaseLost

    try:
        plan["lease"].verify()
    except LeaseLost as err:
        return fail(f"{err}; summary.json, shards.txt and README.md are left to the driver that holds it",
                    EXIT_FAILED)
    return _finish(plan, cfg, failed, retries, wall)


def _finish(plan: dict[str, Any], cfg: Config, failed: dict[int, str], retries: int, wall: float) -> int:
    from pipeline.budget.accounting import run_accounting
    from pipeline.io.nightly import finish_night
    from pipeline.io.retired import dataset_shards
    from pipeline.io.run_folder import complete_stats, summarize, write_card, write_index, write_summary

    fs, out, info, night = plan["fs"], plan["out"], plan["info"], plan["night"]
    num_shards = night.placement.num_shards  # every night's shards, not only tonight's
    planned = [s.shard for s in plan["specs"]]  # tonight's: each must be complete for exit 0
    stats = complete_stats(fs, out, list(range(num_shards)), info.config_hash)
    listed = dataset_shards(fs, out, stats, night.placement)
    retired = len(night.placement.retired_ids())
    single = None if cfg.engine.generator == CASCADE else cfg.engine.generator  # a cascade's markers name theirs
    accounting = run_accounting(stats, cfg.cost.gpu_hour_price, cfg.job.target_accepted, prompt_attempt_limit(cfg),
                                single)
    summary = summarize(fs, out, num_shards, list(failed), wall, retries, plan["skipped"], plan["scorer"],
                        accounting, stats, listed, retired)
    try:
        write_summary(fs, out, summary)
        write_index(fs, out, plan["output_uri"], listed)
        write_card(fs, out, info, summary, listed)
        finish_night(fs, out, info, {s.shard for s in stats}, list(failed))
    except OSError as err:  # a full or read-only disk: the shards are kept, the run's files are not written
        return fail(f"output {plan['output_uri']}: could not write summary.json / shards.txt / README.md "
                    f"({str(err).splitlines()[0]}); free space and rerun the same command", EXIT_FAILED)
    print(
        f"done: {summary.shards_completed}/{summary.shards_total} shards, {summary.samples} samples: "
        f"{summary.accepted} accepted, {summary.rejected} rejected, {summary.failed} failed, "
        f"{summary.invalid_input} invalid input; {summary.images_per_hour:.0f} images/hour",
        file=sys.stderr,
    )
    _print_accounting(summary)
    if failed:
        for shard, why in sorted(failed.items()):
            print(f"shard {shard:06d} failed: {why}", file=sys.stderr)
        fail(f"{len(failed)} shard(s) failed after retries: {', '.join(f'{s:06d}' for s in sorted(failed))}; "
             "rerun the same command to resume", EXIT_FAILED)
        return EXIT_FAILED
    missing = sorted(set(planned) - {s.shard for s in stats})
    if missing:  # never 0 while a planned shard is not complete, whatever the pool reported
        return fail(f"{len(missing)} shard(s) not complete: {', '.join(f'{s:06d}' for s in missing[:10])}"
                    f"{' ...' if len(missing) > 10 else ''}; rerun the same command to resume", EXIT_FAILED)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
