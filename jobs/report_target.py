"""The report's cost and target section: per category acceptance and seconds per accepted image (a
table and a bar chart), attempts per prompt, and the prompts that ended short of the target."""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pipeline.budget.accounting import category_of

_MADE = ("accepted", "rejected", "failed")


def category_rows(records: list[dict[str, Any]], price: float | None) -> list[dict[str, Any]]:
    """Per category, from the sidecars: prompts, samples, accepted, acceptance, seconds per accepted."""
    cats: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"prompts": set(), "samples": 0, "accepted": 0, "seconds": 0.0}
    )
    for r in records:
        if r["status"] not in _MADE:
            continue
        c = cats[category_of(r.get("category"))]
        c["prompts"].add(r["prompt_id"])
        c["samples"] += 1
        c["accepted"] += r["status"] == "accepted"
        c["seconds"] += r.get("seconds") or 0.0
    rows = []
    for name, c in sorted(cats.items()):
        per = c["seconds"] / c["accepted"] if c["accepted"] else None
        rows.append({"category": name, "prompts": len(c["prompts"]), "samples": c["samples"], "accepted": c["accepted"],
                     "acceptance_rate": c["accepted"] / c["samples"], "seconds_per_accepted": per,
                     "cost_per_accepted": per / 3600 * price if per is not None and price else None})
    return rows


def generator_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (generator, category) of the made samples: samples, accepted, acceptance rate, device seconds per
    accepted image and share of the category's accepted images (a cascade's split; old runs: one generator)."""
    cells: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"samples": 0, "accepted": 0, "seconds": 0.0})
    for r in records:
        if r["status"] not in _MADE:
            continue
        c = cells[(r.get("generator") or "inversion", category_of(r.get("category")))]
        c["samples"] += 1
        c["accepted"] += r["status"] == "accepted"
        c["seconds"] += r.get("seconds") or 0.0
    by_cat: Counter = Counter()
    for (_, cat), c in cells.items():
        by_cat[cat] += c["accepted"]
    return [{"generator": gen, "category": cat, "samples": c["samples"], "accepted": c["accepted"],
             "acceptance_rate": c["accepted"] / c["samples"],
             "seconds_per_accepted": c["seconds"] / c["accepted"] if c["accepted"] else None,
             "share": c["accepted"] / by_cat[cat] if by_cat[cat] else None}
            for (gen, cat), c in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def _generator_table(records: list[dict[str, Any]]) -> str:
    rows = generator_rows(records)
    if len({r["generator"] for r in rows}) < 2:
        return ""
    head = ("<tr><th>category</th><th>generator</th><th>samples</th><th>accepted</th><th>acceptance rate</th>"
            "<th>s per accepted</th><th>share of the category's accepted</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(r['category'])}</td><td>{html.escape(r['generator'])}</td><td>{r['samples']}</td>"
        f"<td>{r['accepted']}</td><td>{r['acceptance_rate']:.1%}</td><td>{_fmt(r['seconds_per_accepted'], '.2f')}</td>"
        f"<td>{'n/a' if r['share'] is None else format(r['share'], '.1%')}</td></tr>" for r in rows)
    return f"<h2>Per generator and category</h2><table>{head}{body}</table>"


def attempts_per_prompt(records: list[dict[str, Any]]) -> Counter:
    """How many prompts made 1, 2, ... samples."""
    per = Counter(r["prompt_id"] for r in records if r["status"] in _MADE)
    return Counter(per.values())


def _bars(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["category"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3), dpi=100)
    a.bar(names, [r["acceptance_rate"] for r in rows], color="#2a2")
    a.set_ylim(0, 1)
    a.set_title("acceptance rate")
    b.bar(names, [r["seconds_per_accepted"] or 0.0 for r in rows], color="#4a7ebb")
    b.set_title("device seconds per accepted image")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _attempts_chart(dist: Counter, target: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(dist)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.bar([str(x) for x in xs], [dist[x] for x in xs], color="#4a7ebb")
    ax.set_xlabel("samples made")
    ax.set_ylabel("prompts")
    ax.set_title(f"attempts per prompt (target {target})" if target else "attempts per prompt")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def target_section(records: list[dict[str, Any]], summary: dict[str, Any], folder: Path) -> str:
    """HTML for the section; its charts are written into ``folder``."""
    rows = category_rows(records, summary.get("gpu_hour_price"))
    if not rows:
        return ""
    _bars(rows, folder / "categories.png")
    head = ("<tr><th>category</th><th>prompts</th><th>samples</th><th>accepted</th><th>acceptance rate</th>"
            "<th>s per accepted</th><th>cost per accepted</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(r['category'])}</td><td>{r['prompts']}</td><td>{r['samples']}</td>"
        f"<td>{r['accepted']}</td><td>{r['acceptance_rate']:.1%}</td><td>{_fmt(r['seconds_per_accepted'], '.2f')}</td>"
        f"<td>{_fmt(r['cost_per_accepted'], '.4f')}</td></tr>" for r in rows
    )
    generators = sorted({r.get("generator") or "inversion" for r in records if r["status"] in _MADE})
    parts = ["<h2>Acceptance and device time per category</h2>",
             f"<p>Generator: {html.escape(', '.join(generators) or 'n/a')}.</p>",
             f"<p>Overall: {_fmt(summary.get('seconds_per_accepted'), '.2f')} device seconds per accepted image, "
             f"cost per accepted image {_fmt(summary.get('cost_per_accepted'), '.4f')}.</p>",
             f"<table>{head}{body}</table>", '<img src="categories.png" alt="per-category bars">',
             _generator_table(records)]
    target = summary.get("target_accepted")
    _attempts_chart(attempts_per_prompt(records), target, folder / "attempts.png")
    parts.append("<h2>Attempts per prompt</h2><img src='attempts.png' alt='attempts per prompt'>")
    if target:
        parts.append(_short_table(summary.get("short_prompts") or {}, target))
    return "".join(parts)


def generators_section(run: str, compare_runs: list[str], summary: dict[str, Any]) -> str:
    """This run and earlier runs of other generators: projected GPU-hours for this run's prompts and target."""
    if not compare_runs:
        return ""
    from pipeline.budget.run_plan import project_generators, rates_by_generator

    rates_by_generator([run], "--run")  # this run's own problems named as such
    by_generator = rates_by_generator([run, *compare_runs], "--compare-run")
    prompts = {name: c["prompts"] for name, c in (summary.get("categories") or {}).items()
               if isinstance(c, dict) and isinstance(c.get("prompts"), int) and c["prompts"] >= 0}
    target, most = summary.get("target_accepted") or 0, summary.get("max_samples_per_prompt") or 0
    projected = project_generators(by_generator, prompts, target, most)
    names = list(projected)
    what = "GPU-hours to the target" if target else "device seconds per accepted image"
    key = "gpu_hours" if target else "seconds_per_accepted"
    head = "<tr><th>category</th><th>prompts</th>" + "".join(
        f"<th>{html.escape(n)}: acceptance</th><th>{html.escape(n)}: {what}</th>" for n in names) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(cat)}</td><td>{n}</td>" + "".join(
            f"<td>{projected[g][cat]['acceptance_rate']:.1%}</td><td>{_fmt(projected[g][cat][key], '.4f')}</td>"
            for g in names) + "</tr>"
        for cat, n in sorted(prompts.items())
    )
    runs = "; ".join(f"{html.escape(g)}: {html.escape(', '.join(r['source']['runs']))}"
                     for g, r in by_generator.items())
    scope = (f"this run's prompts per category and its target ({target} accepted, at most {most} samples per prompt)"
             if target else "this run has no target: seconds per accepted image (1 / acceptance attempts each)")
    return (f"<h2>Generators compared</h2><p>Rates of the earlier runs ({runs}), projected for {scope}.</p>"
            f"<table>{head}{body}</table>")


def _short_table(short: dict[str, list[dict[str, Any]]], target: int) -> str:
    items = [i for v in short.values() for i in v]
    if not items:
        return f"<h2>Prompts short of the target ({target})</h2><p>none</p>"
    head = "<tr><th>category</th><th>prompt_id</th><th>accepted</th><th>tried</th><th>short by</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(i['category'])}</td><td>{html.escape(str(i['prompt_id']))}</td><td>{i['accepted']}</td>"
        f"<td>{i['tried']}</td><td>{i['short_by']}</td></tr>" for i in items
    )
    counts = ", ".join(f"{html.escape(c)}: {len(v)}" for c, v in short.items())
    return f"<h2>Prompts short of the target ({target})</h2><p>{len(items)} ({counts})</p><table>{head}{body}</table>"
