"""Run the inversion engine on 4 T2I-CompBench prompts with the tiny models, printing losses.

    python examples/run_engine.py [--config configs/tiny.yaml] [--set section.key=value ...]

The tiny models have random weights: the images are noise and the losses only show the
plumbing (per-iteration referee losses, gradient norms after balancing, lr and SDS weight).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.engine.invert import InversionEngine, SampleRequest, sample_seed  # noqa: E402
from pipeline.models.loading import load_generator_models  # noqa: E402

PROMPTS = ROOT / "data" / "t2i-compbench" / "color_val.txt"


def read_prompts(path: Path, limit: int) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=preset_path("tiny"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()

    cfg = load_config(args.config, ["engine.trace=true", *args.overrides])
    models = load_generator_models(cfg)
    engine = InversionEngine(models, cfg)
    prompts = read_prompts(args.prompts, args.count)
    requests = [
        SampleRequest(p, f"color_val-{i}", 0, sample_seed(cfg.job.seed, f"color_val-{i}", 0))
        for i, p in enumerate(prompts)
    ]
    t0 = time.perf_counter()
    results = engine.run(requests)
    print(f"{len(results)} samples in {time.perf_counter() - t0:.2f}s on {models.device}")
    for r in results:
        print(f"\n{r.request.prompt_id}: {r.request.prompt!r} seed={r.seed}")
        for row in r.trace or []:
            losses = (
                f"itm={row['itm']:.4f} caption={row['caption']:.4f} total={row['total']:.4f} "
                f"|g_ref|={row['g_ref_norm']:.3g} " if row["phase"] == "joint" else " " * 8
            )
            print(f"  it {row['iteration']:3d} {row['phase']:5s} {losses}|g_sds|={row['g_sds_norm']:.3g} "
                  f"lr={row['lr']:.3f} sds_w={row['sds_weight']:.1f}")
        if r.error:
            print(f"  failed: {r.error}")
        else:
            print(f"  final: itm_score={r.itm_score:.4f} losses={r.final_losses} image={tuple(r.image.shape)}")


if __name__ == "__main__":
    main()
