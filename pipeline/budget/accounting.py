"""Device time and acceptance per category: per shard (its stats marker) and per run (summary.json).

A sample's ``seconds`` is the device time it used: its share of its optimisation batches (restarts
included, ``SampleResult.seconds``) plus its own encoding and scoring. A shard's marker sums them
per category and lists the prompts that ended short of the target; the summary adds the shards up
and derives seconds per accepted image, acceptance rates and, with a device-hour price, the cost
per accepted image. Both also split the counts by the generator that made each sample (``generators``:
per generator, per category), so a cascade's summary says what each generator cost per accepted image and
what share of the dataset it made.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.budget.refill import PromptAttempts
from schemas.prompts import PromptRow
from schemas.samples import ACCEPTED, FAILED, REJECTED, SampleRecord

NO_CATEGORY = "(none)"
_COUNTED = (ACCEPTED, REJECTED, FAILED)


def category_of(category: str | None) -> str:
    return category or NO_CATEGORY


def _empty() -> dict[str, Any]:
    return {"prompts": 0, "samples": 0, "accepted": 0, "rejected": 0, "failed": 0, "seconds": 0.0}


def shard_accounting(
    records: Iterable[SampleRecord], rows: list[PromptRow], prompts: list[PromptAttempts],
    full_iterations: int | None = None,
) -> dict[str, Any]:
    """The stats-marker fields: ``device_seconds``, ``categories`` and ``short`` (prompts short of target);
    with ``full_iterations`` (a monitored run) also ``monitor`` (``monitor_accounting``)."""
    records = list(records)
    cats: dict[str, dict[str, Any]] = {}
    for p in prompts:
        cats.setdefault(category_of(rows[p.row_in_shard].category), _empty())["prompts"] += 1
    total = 0.0
    for rec in records:
        if rec.status not in _COUNTED:
            continue
        c = cats.setdefault(category_of(rec.category), _empty())
        c["samples"] += 1
        c[rec.status] += 1
        c["seconds"] += rec.seconds
        total += rec.seconds
    for c in cats.values():
        c["seconds"] = round(c["seconds"], 3)
    short = [
        {"prompt_id": rows[p.row_in_shard].prompt_id, "category": category_of(rows[p.row_in_shard].category),
         "row": rows[p.row_in_shard].row, "accepted": p.accepted, "tried": p.issued, "short_by": p.short_by}
        for p in prompts if p.short_by
    ]
    out = {"device_seconds": round(total, 3), "categories": cats, "short": short,
           "generators": generator_accounting(records)}
    if full_iterations:
        out["monitor"] = monitor_accounting(records, full_iterations)
    return out


def generator_accounting(records: Iterable[SampleRecord]) -> dict[str, dict[str, dict[str, Any]]]:
    """{generator: {category: {samples, accepted, rejected, failed, seconds}}} of the made samples."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for rec in records:
        if rec.status not in _COUNTED:
            continue
        c = out.setdefault(rec.generator, {}).setdefault(category_of(rec.category), _made())
        c["samples"] += 1
        c[rec.status] += 1
        c["seconds"] += rec.seconds
    for cats in out.values():
        for c in cats.values():
            c["seconds"] = round(c["seconds"], 3)
    return out


def _made() -> dict[str, Any]:
    return {"samples": 0, "accepted": 0, "rejected": 0, "failed": 0, "seconds": 0.0}


def run_generator_accounting(stats: Iterable[Any], price: float, default_generator: str | None) -> dict[str, Any]:
    """summary.json's ``generators``: per generator, its rates and ``share`` (of the run's accepted images),
    overall and per category (there ``share`` is of the category's accepted images). A marker written before
    markers split by generator counts for ``default_generator`` (the run's single generator; None: left out)."""
    gens: dict[str, dict[str, dict[str, Any]]] = {}
    for s in stats:
        split = getattr(s, "generators", None)
        if not split and default_generator:
            split = {default_generator: {n: {k: c.get(k, 0) for k in _made()} for n, c in (s.categories or {}).items()}}
        for gen, cats in (split or {}).items():
            for name, c in cats.items():
                into = gens.setdefault(gen, {}).setdefault(name, _made())
                for k in into:
                    into[k] += c.get(k, 0)
    accepted = sum(c["accepted"] for cats in gens.values() for c in cats.values())
    by_cat: dict[str, int] = {}
    for cats in gens.values():
        for name, c in cats.items():
            by_cat[name] = by_cat.get(name, 0) + c["accepted"]
    out = {}
    for gen, cats in sorted(gens.items()):
        overall = {k: sum(c[k] for c in cats.values()) for k in _made()}
        out[gen] = {
            **_rates(overall, price), "share": round(overall["accepted"] / accepted, 4) if accepted else None,
            "categories": {name: {**_rates(c, price),
                                  "share": round(c["accepted"] / by_cat[name], 4) if by_cat[name] else None}
                           for name, c in sorted(cats.items())},
        }
    return out


_MONITOR_SUMS = ("samples", "accepted", "early_exits", "iterations_run", "iterations_full", "seconds",
                 "monitor_seconds", "seconds_without")


def monitor_accounting(records: Iterable[SampleRecord], full_iterations: int) -> dict[str, dict[str, float]]:
    """Per category: what in-loop monitoring saved (``pipeline/engine/monitor.py``).

    ``seconds_without`` estimates each sample's device time had it run all ``full_iterations``: its
    optimisation time (less the checks) scaled by full / run iterations, plus its own final scoring. It
    assumes the same samples accepted; the measured comparison at equal acceptance is benchmarks/early_exit.py.
    """
    cats: dict[str, dict[str, float]] = {}
    for rec in records:
        if rec.status not in _COUNTED or rec.exit_reason is None:
            continue
        c = cats.setdefault(category_of(rec.category), dict.fromkeys(_MONITOR_SUMS, 0))
        optimise = max(rec.seconds - rec.score_seconds - rec.monitor_seconds, 0.0)
        c["samples"] += 1
        c["accepted"] += rec.status == ACCEPTED
        c["early_exits"] += rec.exit_reason == "early_exit"
        c["iterations_run"] += rec.iterations
        c["iterations_full"] += full_iterations
        c["seconds"] += rec.seconds
        c["monitor_seconds"] += rec.monitor_seconds
        c["seconds_without"] += rec.score_seconds + optimise * full_iterations / max(rec.iterations, 1)
    return {name: {k: round(v, 3) if isinstance(v, float) else v for k, v in c.items()} for name, c in cats.items()}


def _monitor_rates(c: dict[str, float]) -> dict[str, Any]:
    acc = c["accepted"]
    return {
        **{k: round(v, 3) for k, v in c.items()},
        "iterations_saved": round(c["iterations_full"] - c["iterations_run"], 3),
        "iterations_saved_fraction": round(1 - c["iterations_run"] / c["iterations_full"], 4)
        if c["iterations_full"] else None,
        "monitor_overhead": round(c["monitor_seconds"] / c["seconds"], 4) if c["seconds"] else None,
        "seconds_per_accepted": round(c["seconds"] / acc, 4) if acc else None,
        "seconds_per_accepted_without": round(c["seconds_without"] / acc, 4) if acc else None,
    }


def run_monitor_accounting(stats: Iterable[Any]) -> dict[str, Any]:
    """summary.json's ``monitor``: the markers' per-category sums, overall and per category, with the
    iterations saved and seconds per accepted image with and (estimated) without monitoring. Empty when
    no shard was monitored."""
    cats: dict[str, dict[str, float]] = {}
    for s in stats:
        for name, c in (getattr(s, "monitor", None) or {}).items():
            into = cats.setdefault(name, dict.fromkeys(_MONITOR_SUMS, 0))
            for k in _MONITOR_SUMS:
                into[k] += c.get(k, 0)
    if not cats:
        return {}
    overall = {k: sum(c[k] for c in cats.values()) for k in _MONITOR_SUMS}
    return {**_monitor_rates(overall), "categories": {n: _monitor_rates(c) for n, c in sorted(cats.items())}}


def _rates(c: dict[str, Any], price: float) -> dict[str, Any]:
    """Derived figures of one category (or of the run)."""
    acc, samples, secs = c["accepted"], c["samples"], c["seconds"]
    per_acc = secs / acc if acc else None
    return {
        **c, "seconds": round(secs, 3),
        "acceptance_rate": round(acc / samples, 4) if samples else None,
        "seconds_per_sample": round(secs / samples, 4) if samples else None,
        "seconds_per_accepted": round(per_acc, 4) if per_acc is not None else None,
        "cost_per_accepted": round(per_acc / 3600 * price, 8) if per_acc is not None and price > 0 else None,
    }


def run_accounting(stats: Iterable[Any], price: float, target: int, max_samples: int,
                   default_generator: str | None = "inversion") -> dict[str, Any]:
    """The summary.json fields, from the complete shards' markers (``ShardStats``)."""
    stats = list(stats)
    cats: dict[str, dict[str, Any]] = {}
    short: dict[str, list[dict[str, Any]]] = {}
    for s in stats:
        for name, c in (s.categories or {}).items():
            into = cats.setdefault(name, _empty())
            for k in into:
                into[k] += c.get(k, 0)
        for item in s.short or []:
            short.setdefault(item["category"], []).append(item)
    overall = _empty()
    for c in cats.values():
        for k in overall:
            overall[k] += c[k]
    total = _rates(overall, price)
    return {
        "device_seconds": total["seconds"], "device_hours": round(total["seconds"] / 3600, 6),
        "seconds_per_accepted": total["seconds_per_accepted"], "acceptance_rate": total["acceptance_rate"],
        "gpu_hour_price": price or None, "cost_per_accepted": total["cost_per_accepted"],
        "total_cost": round(total["seconds"] / 3600 * price, 4) if price > 0 else None,
        "target_accepted": target or None, "max_samples_per_prompt": max_samples if target else None,
        "categories": {name: _rates(c, price) for name, c in sorted(cats.items())},
        "short_prompts": {name: sorted(items, key=lambda i: i["row"]) for name, items in sorted(short.items())},
        "short_prompts_total": sum(len(v) for v in short.values()),
        "monitor": run_monitor_accounting(stats),
        "generators": run_generator_accounting(stats, price, default_generator),
    }
