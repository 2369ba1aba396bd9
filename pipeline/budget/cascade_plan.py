"""What a cascade (``engine.generator: cascade``) will make and cost, and ``cascade.stages: auto``'s choice.

Per prompt with target K, stages i = 1, 2, ... with acceptance rate p_i, device seconds per sample s_i and
budget b_i: attempts are made in index order, stage by stage, and attempt j is made iff fewer than K of the
attempts before it were accepted (in-shard refill makes exactly these, ``pipeline.budget.refill``). With
attempts independent, the distribution of "accepted so far" evolves attempt by attempt:
    an attempt of stage i is made with probability P(a < K) and moves a -> a + 1 with probability p_i,
so E[attempts of stage i], E[accepted of stage i] and P(short) = P(a_final < K) follow exactly (``expect``).
GPU-seconds per accepted image = sum_i s_i E[attempts_i] / sum_i E[accepted_i].

``auto`` (per category): the stage-1 budget b_1 in 0 .. stages[0].max_samples that minimises seconds per
accepted image (ties: the smaller b_1), the later stages' budgets as configured. The rates of each generator
come from earlier runs (``--from-run``: a single-generator run's categories, a cascade run's ``generators``
split), else from the FLOP floor at ``cost.plan_acceptance_rate``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pipeline.budget.accounting import NO_CATEGORY, category_of
from pipeline.config import Config, cascade_budgets
from schemas.prompts import STATUS_OK, PromptRow


@dataclass(frozen=True)
class StageRates:
    generator: str
    acceptance_rate: float  # p
    seconds_per_sample: float  # s


@dataclass
class Expectation:
    attempts: list[float]  # per stage
    accepted: list[float]  # per stage
    short: float  # P(fewer than K accepted)
    seconds: float  # sum_i s_i E[attempts_i]

    @property
    def seconds_per_accepted(self) -> float | None:
        acc = sum(self.accepted)
        return self.seconds / acc if acc > 0 else None


def expect(k: int, stages: list[StageRates], budgets: list[int]) -> Expectation:
    """Expected attempts and accepted images per stage of one prompt with target ``k`` (see the module doc)."""
    dist = [1.0] + [0.0] * k  # P(a accepted so far), a = 0 .. k
    attempts, accepted = [], []
    for rates, budget in zip(stages, budgets):
        p = rates.acceptance_rate
        made = acc = 0.0
        for _ in range(budget):
            live = sum(dist[:k])  # an attempt is made only while short
            made += live
            acc += live * p
            nxt = [0.0] * (k + 1)
            for a in range(k):
                nxt[a] += dist[a] * (1 - p)
                nxt[a + 1] += dist[a] * p
            nxt[k] += dist[k]
            dist = nxt
        attempts.append(made)
        accepted.append(acc)
    seconds = sum(r.seconds_per_sample * n for r, n in zip(stages, attempts))
    return Expectation(attempts, accepted, sum(dist[:k]), seconds)


def choose_first_budget(k: int, stages: list[StageRates], budgets: list[int]) -> tuple[int, dict[int, float | None]]:
    """The stage-1 budget in 0 .. budgets[0] with the fewest expected seconds per accepted image (ties: the
    smaller), and every candidate's value (None: nothing accepted)."""
    values = {b: expect(k, stages, [b, *budgets[1:]]).seconds_per_accepted for b in range(budgets[0] + 1)}
    finite = [(v, b) for b, v in values.items() if v is not None]
    best = min(finite)[1] if finite else budgets[0]
    return best, values


def stage_rates(cfg: Config, by_generator: dict[str, dict[str, Any]], floors: dict[str, Any],
                category: str) -> list[StageRates]:
    """Each stage's (p, s) for ``category``: the earlier runs' rates of its generator, else the floor's."""
    out = []
    for stage in cfg.cascade.stages:
        rates = by_generator.get(stage.generator) or floors[stage.generator]
        p, s = rates["per_category"].get(category, rates["overall"])
        out.append(StageRates(stage.generator, p, s))
    return out


def floors_by_generator(cfg: Config, rows: list[PromptRow]) -> dict[str, Any]:
    """The FLOP-floor rates of each stage's generator (for generators no earlier run measured)."""
    from pipeline.budget.run_plan import rates_from_floor

    out = {}
    for stage in cfg.cascade.stages:
        one = copy.deepcopy(cfg)
        one.engine.generator = stage.generator
        out[stage.generator] = rates_from_floor(one, rows)
    return out


def choose_auto(cfg: Config, rows: list[PromptRow], by_generator: dict[str, dict[str, Any]]) -> dict[str, int]:
    """``cascade.auto``: the stage-1 budget per category of ``rows`` (what the run records in
    cascade.first_stage_by_category)."""
    floors = floors_by_generator(cfg, rows)
    budgets = [stage.max_samples for stage in cfg.cascade.stages]
    out = {}
    for name in sorted({category_of(r.category) for r in rows if r.status == STATUS_OK}):
        stages = stage_rates(cfg, by_generator, floors, name)
        out[name] = choose_first_budget(cfg.job.target_accepted, stages, budgets)[0]
    return out


def cascade_plan(cfg: Config, rows: list[PromptRow], by_generator: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """plan.json's ``cascade``: per category the stage budgets (auto's choice), the formula's inputs, the
    expected attempts, accepted images and GPU-hours per stage, and the run's totals and generator mix."""
    floors = floors_by_generator(cfg, rows)
    k = cfg.job.target_accepted
    configured = [stage.max_samples for stage in cfg.cascade.stages]
    counts: dict[str, int] = {}
    for r in rows:
        if r.status == STATUS_OK:
            counts[category_of(r.category)] = counts.get(category_of(r.category), 0) + 1
    cats, totals = {}, {"seconds": 0.0, "accepted": 0.0, "samples": 0.0, "short": 0.0}
    mix: dict[str, dict[str, float]] = {s.generator: {"samples": 0.0, "accepted": 0.0, "seconds": 0.0}
                                        for s in cfg.cascade.stages}
    for name, n in sorted(counts.items()):
        stages = stage_rates(cfg, by_generator, floors, name)
        candidates = None
        if cfg.cascade.auto:
            first, candidates = choose_first_budget(k, stages, configured)
            budgets = [first, *configured[1:]]
        else:
            budgets = cascade_budgets(cfg, None if name == NO_CATEGORY else name)
        e = expect(k, stages, budgets)
        cats[name] = {
            "prompts": n, "budgets": budgets,
            "inputs": {"target_accepted": k, "stages": [
                {"generator": s.generator, "acceptance_rate": round(s.acceptance_rate, 6),
                 "seconds_per_sample": round(s.seconds_per_sample, 6), "max_samples": b}
                for s, b in zip(stages, budgets)]},
            "stages": [{"generator": s.generator, "expected_samples": round(n * a, 3),
                        "expected_accepted": round(n * c, 3),
                        "gpu_hours": round(n * a * s.seconds_per_sample / 3600, 6)}
                       for s, a, c in zip(stages, e.attempts, e.accepted)],
            "expected_short_prompts": round(n * e.short, 3),
            "seconds_per_accepted": round(e.seconds_per_accepted, 4) if e.seconds_per_accepted is not None else None,
            "gpu_hours": round(n * e.seconds / 3600, 6),
        }
        if candidates is not None:
            cats[name]["seconds_per_accepted_by_first_budget"] = {
                str(b): (round(v, 4) if v is not None else None) for b, v in candidates.items()}
        totals["seconds"] += n * e.seconds
        totals["accepted"] += n * sum(e.accepted)
        totals["samples"] += n * sum(e.attempts)
        totals["short"] += n * e.short
        for s, a, c in zip(stages, e.attempts, e.accepted):
            mix[s.generator]["samples"] += n * a
            mix[s.generator]["accepted"] += n * c
            mix[s.generator]["seconds"] += n * a * s.seconds_per_sample
    acc = totals["accepted"]
    sources = {g: (by_generator[g]["source"] if g in by_generator else {"kind": "flop_floor",
                                                                        "note": floors[g]["source"]["note"]})
               for g in mix}
    return {
        "auto": cfg.cascade.auto, "target_accepted": k, "categories": cats,
        "first_stage_by_category": {name: c["budgets"][0] for name, c in cats.items()},
        "mix": {g: {"expected_samples": round(m["samples"], 3), "expected_accepted": round(m["accepted"], 3),
                    "share": round(m["accepted"] / acc, 4) if acc else None,
                    "gpu_hours": round(m["seconds"] / 3600, 6)} for g, m in mix.items()},
        "expected_samples": round(totals["samples"], 3), "expected_accepted": round(acc, 3),
        "expected_short_prompts": round(totals["short"], 3), "gpu_hours": round(totals["seconds"] / 3600, 6),
        "seconds_per_accepted": round(totals["seconds"] / acc, 4) if acc else None, "rates_from": sources,
    }


def format_cascade(plan: dict[str, Any]) -> list[str]:
    """--plan's lines for a cascade: per category the stage budgets and the expected mix; the totals."""
    names = [s["generator"] for s in next(iter(plan["categories"].values()), {"stages": []})["stages"]]
    lines = [("cascade (auto: stage-1 budget per category chosen for the fewest GPU-seconds per accepted image):"
              if plan["auto"] else "cascade:") + " " + " -> ".join(names)]
    for name, c in plan["categories"].items():
        parts = ", ".join(f"{s['generator']} {b} max: {s['expected_samples']:.1f} samples, "
                          f"{s['expected_accepted']:.1f} accepted" for s, b in zip(c["stages"], c["budgets"]))
        spa = c["seconds_per_accepted"]
        lines.append(f"  {name[:15]:<16}{parts}; {'n/a' if spa is None else f'{spa:.2f}'} s per accepted, "
                     f"{c['gpu_hours']:.3f} GPU-h")
    mix = ", ".join(f"{g} {m['share']:.1%}" if m["share"] is not None else f"{g} n/a" for g, m in plan["mix"].items())
    lines.append(f"cascade total: {plan['expected_accepted']:.1f} accepted ({mix}), {plan['gpu_hours']:.3f} GPU-hours, "
                 f"{'n/a' if plan['seconds_per_accepted'] is None else format(plan['seconds_per_accepted'], '.2f')} "
                 "s per accepted")
    if plan["auto"]:
        chosen = ", ".join(f"{k}: {v}" for k, v in plan["first_stage_by_category"].items())
        lines.append(f"auto's stage-1 budgets: {{{chosen}}} (a run with the same --from-run chooses the same)")
    return lines
