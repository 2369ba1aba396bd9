"""A visual report of a run: ``RUN_DIR/report/index.html`` with its PNGs beside it.

    python jobs/report.py --run RUN_DIR [--samples 24] [--compare-run OTHER_RUN_DIR ...]

Totals, acceptance rate and throughput; per category a histogram of VQA scores with the
threshold marked; a contact sheet of accepted and rejected samples with prompt and score; and
per-question answer rates (which noun phrases fail most); acceptance and device seconds per accepted
image per category, attempts per prompt and the prompts short of a target (``jobs/report_target.py``);
with ``--compare-run`` (runs of the other generator), each generator's GPU-hours for this run's target;
with a referee zoo, each referee's mean final match score and loss per category, and how many samples it
did not judge.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import run_main  # noqa: E402
from jobs.report_target import generators_section, target_section  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.io import storage  # noqa: E402
from pipeline.io.reader import completed_shards, shard_images, sidecar_records  # noqa: E402

_THUMB = 160
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
.sheet{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;font-size:12px}
.card img{width:160px;height:160px;image-rendering:pixelated;border:3px solid #ccc}
.accepted img{border-color:#2a2}.rejected img{border-color:#c33}
"""


def _histogram(scores: list[float], threshold: float | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.hist(scores, bins=20, range=(0.0, 1.0), color="#4a7ebb")
    if threshold is not None:
        ax.axvline(threshold, color="#c33", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend()
    ax.set_xlabel("BLIP-VQA score")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _thumbnails(run: str, keys: set[str], folder: Path, shards: list[int]) -> dict[str, str]:
    """Write a PNG thumbnail per wanted key of the complete ``shards``; returns key -> file name in the report."""
    from PIL import Image

    fs, out = storage.filesystem_for(run)
    names: dict[str, str] = {}
    for shard in shards:
        for key, data in shard_images(fs, out, shard, keys):
            img = Image.open(io.BytesIO(data)).convert("RGB")
            img.thumbnail((_THUMB, _THUMB))
            names[key] = f"thumbs/{key}.png"
            img.save(folder / names[key])
    return names


def question_rates(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per question: how often asked, mean p(yes), share answered below 0.5; worst first."""
    answers: dict[str, list[float]] = defaultdict(list)
    for r in records:
        for q, a in zip(r.get("vqa_questions") or [], r.get("vqa_answers") or []):
            answers[q].append(a)
    rows = [
        {"question": q, "count": len(v), "mean_yes": sum(v) / len(v), "fail_rate": sum(a < 0.5 for a in v) / len(v)}
        for q, v in answers.items()
    ]
    return sorted(rows, key=lambda r: (-r["fail_rate"], r["mean_yes"], r["question"]))


def _pick(records: list[dict[str, Any]], status: str, n: int) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == status][:n]


def _card(rec: dict[str, Any], thumb: str | None) -> str:
    img = f'<img src="{html.escape(thumb)}" alt="{html.escape(rec["key"])}">' if thumb else "<div>(no image)</div>"
    score = f"{rec['vqa_score']:.4f}" if rec.get("vqa_score") is not None else "n/a"
    return (f'<div class="card {rec["status"]}">{img}<div>{html.escape(rec["prompt"] or "")}</div>'
            f"<div>score {score}</div></div>")


def _summary(out: str) -> dict[str, Any]:
    """summary.json, or {} (with a warning) when it is missing or damaged: the report is built from the shards."""
    path = Path(out) / "summary.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError, OSError):
        data = None
    if not isinstance(data, dict):
        print(f"warning: report: {path} is damaged; totals and accounting come from the shards only",
              file=sys.stderr)
        return {}
    return data


def _report_folder(out: str, output: Path | None) -> Path:
    folder = output if output is not None else Path(out) / "report"
    try:
        (folder / "thumbs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        hint = "" if output is not None else " (a read-only run folder? give --output DIR)"
        raise UserError(f"report: cannot write {folder}: {err.strerror or err}{hint}") from None
    return folder


def build_report(run: str, samples: int, compare_runs: list[str] | None = None, output: Path | None = None) -> Path:
    fs, out = storage.filesystem_for(run)
    if not storage.is_local(fs):
        raise UserError("report: --run must be a local folder (copy the run's shards locally first)")
    try:
        shards = completed_shards(fs, out, warn="report")  # the rule every reader applies
    except UserError as err:
        raise UserError(f"report: {err}") from None
    records = sidecar_records(run, shards=shards)
    folder = _report_folder(out, output)
    summary = _summary(out)
    made = [r for r in records if r["status"] in ("accepted", "rejected")]
    run_info = json.loads((Path(out) / "run.json").read_text())
    parts = [f"<h1>Run report: {html.escape(Path(out).name)}</h1>", _totals(records, summary),
             _nights_table(night_rows(records, run_info.get("history") or []))]
    parts.append("<h2>VQA scores per category</h2>")
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in made:
        by_cat[r["category"] or "(none)"].append(r)
    for i, (cat, recs) in enumerate(sorted(by_cat.items())):
        name = f"hist_{i}.png"
        thresholds = {r["threshold"] for r in recs if r["threshold"] is not None}
        thr = thresholds.pop() if len(thresholds) == 1 else None
        _histogram([r["vqa_score"] for r in recs], thr, f"{cat} ({len(recs)} samples)", folder / name)
        parts.append(f'<img src="{name}" alt="histogram {html.escape(cat)}">')
    shown = _pick(records, "accepted", samples) + _pick(records, "rejected", samples)
    thumbs = _thumbnails(run, {r["key"] for r in shown}, folder, shards)
    for status in ("accepted", "rejected"):
        cards = "".join(_card(r, thumbs.get(r["key"])) for r in shown if r["status"] == status)
        parts.append(f"<h2>{status.capitalize()} samples</h2><div class='sheet'>{cards or 'none'}</div>")
    parts.append(_question_table(question_rates(made)))
    parts.append(_referee_table(referee_rates(made)))
    parts.append(target_section(records, summary, folder))
    parts.append(generators_section(run, compare_runs or [], summary))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>referee-synth report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    try:
        (folder / "index.html").write_text(page, encoding="utf-8")
    except OSError as err:
        raise UserError(f"report: cannot write {folder / 'index.html'}: {err.strerror or err}") from None
    return folder / "index.html"


def _totals(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    count = defaultdict(int)
    for r in records:
        count[r["status"]] += 1
    judged = count["accepted"] + count["rejected"]
    rate = count["accepted"] / judged if judged else 0.0
    rows = [("samples", len(records)), ("accepted", count["accepted"]), ("rejected", count["rejected"]),
            ("failed", count["failed"]), ("invalid input", count["invalid_input"]),
            ("acceptance rate", f"{rate:.1%}"),
            ("throughput (images/hour)", summary.get("images_per_hour", "n/a")),
            ("wall time (s)", summary.get("wall_seconds", "n/a"))]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<h2>Totals</h2><table>{body}</table>"


def night_rows(records: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per night (invocation) of the folder: when, what the table did, shards run, and the samples of the
    dataset that night made (its complete shards, retired prompts left out)."""
    made: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        made[int(r.get("night") or 0)][r["status"]] += 1
    entries = {int(e.get("night", 0)): e for e in history}
    rows = []
    for night in sorted(set(entries) | set(made)):
        e, counts = entries.get(night, {}), made.get(night, {})
        prompts = e.get("prompts") or {}
        rows.append({"night": night, "started_at": e.get("started_at") or e.get("note") or "",
                     "finished": bool(e.get("finished_at")), "added": prompts.get("added", 0),
                     "changed": prompts.get("changed", 0), "removed": prompts.get("removed", 0),
                     "retired": prompts.get("retired", 0), "shards_run": len(e.get("shards_run") or []),
                     "samples": sum(counts.values()), "accepted": counts.get("accepted", 0),
                     "rejected": counts.get("rejected", 0), "failed": counts.get("failed", 0)})
    return rows


def _nights_table(rows: list[dict[str, Any]]) -> str:
    cols = ("night", "started_at", "finished", "added", "changed", "removed", "retired", "shards_run", "samples",
            "accepted", "rejected", "failed")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<h2>Totals per night</h2><table class='nights'><tr>{head}</tr>{body}</table>"


def _question_table(rates: list[dict[str, Any]]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r['question'])}</td><td>{r['count']}</td><td>{r['mean_yes']:.3f}</td>"
        f"<td>{r['fail_rate']:.1%}</td></tr>" for r in rates[:50]
    )
    head = "<tr><th>question</th><th>asked</th><th>mean p(yes)</th><th>answered no (&lt; 0.5)</th></tr>"
    return f"<h2>Questions that fail most</h2><table>{head}{body}</table>"


def _as_dict(value: Any) -> dict[str, Any]:
    """A sidecar map column reads back as (key, value) pairs; a tar's JSON as a dict."""
    return dict(value or {})


def referee_rates(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (category, referee): samples judged, mean final match score and loss, samples it skipped."""
    judged: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    skipped: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        cat = r.get("category") or "(none)"
        for name, entry in _as_dict(r.get("referee_scores")).items():
            judged[(cat, name)].append(entry)
        for name in _as_dict(r.get("referee_skipped")):
            skipped[(cat, name)] += 1
    rows = []
    for cat, name in sorted(set(judged) | set(skipped)):
        entries = judged.get((cat, name), [])
        kind = entries[0]["kind"] if entries else ""
        rows.append({"category": cat, "referee": name, "kind": kind, "judged": len(entries),
                     "skipped": skipped.get((cat, name), 0), "mean_score": _mean(entries, "score"),
                     "mean_loss": _mean(entries, "loss")})
    return rows


def _mean(entries: list[dict[str, Any]], key: str) -> float | None:
    return sum(e[key] for e in entries) / len(entries) if entries else None


def _referee_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    body = "".join(
        f"<tr><td>{html.escape(r['category'])}</td><td>{html.escape(r['referee'])}</td>"
        f"<td>{html.escape(r['kind'])}</td><td>{r['judged']}</td><td>{r['skipped']}</td>"
        f"<td>{num(r['mean_score'])}</td><td>{num(r['mean_loss'])}</td></tr>" for r in rows
    )
    head = ("<tr><th>category</th><th>referee</th><th>kind</th><th>judged</th><th>skipped (weight 0)</th>"
            "<th>mean final score</th><th>mean final loss</th></tr>")
    return f"<h2>Referees per category</h2><table>{head}{body}</table>"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="local run folder")
    p.add_argument("--samples", type=int, default=24, help="accepted and rejected samples shown (each)")
    p.add_argument("--compare-run", action="append", default=[], metavar="RUN_DIR",
                   help="an earlier run of another generator: GPU-hours of each for this run's target (repeatable)")
    p.add_argument("--output", type=Path, help="report folder (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    path = build_report(args.run, args.samples, args.compare_run, args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
