"""engine.generator through one shard (tiny models): records say which generator made them, the inversion
path's stored images are the ones it made before the choice existed, and the config hash rules."""

from __future__ import annotations

import copy
import hashlib
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.prompts import prompt_table
from pipeline.config import ConfigError
from pipeline.config_loading import load_config, preset_path
from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.io.shards import ShardSpec, shard_paths
from pipeline.io.storage import filesystem_for
from pipeline.process_shard import ShardProcessor
from schemas.prompts import validate_rows
from tests.numerics import recorded_digest

# sha256 over (member name + PNG bytes) of every image (accepted and rejected tars) of _run below with the
# tiny preset, computed at main 43fcec6 (before engine.generator existed) on each kernel path and thread count
# below, with the tiny set built on that path as `make test` builds it (from a fixed seed; under ATen DEFAULT
# its weights differ in the last bits): images are bit-identical on the same kernels and thread count
# (docs/REPRODUCIBILITY.md). Keys: "<torch> <threads> <kernel probe>" (tests/numerics.py); an
# unrecorded kernel path skips and names itself.
INVERSION_DIGESTS_AT_43FCEC6 = {
    # ATen AVX512, oneDNN native: an AVX-512 CPU
    "2.13.0+cpu 1 7c0354594882": "83560fcf651c2234478db1c0a5095bbaaa4cc091461bc8f336dbfab1069d0884",
    "2.13.0+cpu 2 7c0354594882": "5e07a36a75b89958a5ef9649c4d14fec086ef064da4efa3f6e1288980600dfca",
    # ATen AVX2, oneDNN AVX2: an AVX2 CPU
    "2.13.0+cpu 1 abd20a562756": "9c824b092cb96113dff70ec62f156f2ea0a7208acd556e6e71116051d2359287",
    "2.13.0+cpu 2 abd20a562756": "f2e3fcd627638007d30e422162df88040e5660e15879f08393695f3925174342",
    # ATen AVX2 on an AVX-512 CPU (ATEN_CPU_CAPABILITY=avx2)
    "2.13.0+cpu 1 03a7491983ae": "8a0aaf6ea2f32f939141dafe7b2a4ce97f3c4cbdf36dc1758d8a40762ef49af9",
    "2.13.0+cpu 2 03a7491983ae": "4547d54f363758efeee37ac2f4823c524fa3062260f52107c40aa72349be3295",
    # ATen DEFAULT (ATEN_CPU_CAPABILITY=default) with oneDNN AVX-512, AVX2, SSE4.1; its probe depends on threads
    "2.13.0+cpu 1 fad0555ff92d": "14b108f0939953cbb3711a1c6337c22bede6038f75c0098120a3527e41c5b05e",
    "2.13.0+cpu 2 9ffc0a1d0903": "c17acef3973d1d66e0023b7ed9300dd18b924f8b84bc80df9091cccb6f49ff82",
    "2.13.0+cpu 1 c65c6e84d830": "73a56764937fc3bc484adead79174ed4c216a4d5abd943730495720f9360a9f3",
    "2.13.0+cpu 2 0f9363560822": "ebb4025c654f3b03acb372296665908e3116583a1694d66e4a02eea8d0bd2e45",
    "2.13.0+cpu 1 b2808c6307ad": "9540d33476b94f603a0dc922d43362040f92f38fa2f9cc9f2b7066e863d98377",
    "2.13.0+cpu 2 cccb475c4059": "05a86072373802c55c733e3f6be812848cc29c9267be9875ae1b25cf6b89c8b8",
}


def _run(cfg, generator_models, vqa_models, out: Path) -> tuple[list[dict], str]:
    """Three color_val prompts x 2 samples in one shard; the sidecar rows and the images' digest."""
    cfg = copy.deepcopy(cfg)
    cfg.job.samples_per_prompt = 2
    rows = validate_rows([prompt_table([COMPBENCH_DIR / "color_val.txt"]).slice(0, 3)], 2, 1000, 128)
    fs, root = filesystem_for(str(out))
    fs.create_dir(f"{root}/shards", recursive=True)
    ShardProcessor(cfg, generator_models, vqa_models, {"vqa": "tiny"}).process(ShardSpec(0, rows), fs, root)
    digest = hashlib.sha256()
    for tar in sorted(out.rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in sorted(t.getmembers(), key=lambda m: m.name):
                if m.name.endswith(".png"):
                    digest.update(m.name.encode() + t.extractfile(m).read())
    return pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist(), digest.hexdigest()


@pytest.mark.numerics
def test_inversion_images_are_byte_identical_to_before(tiny_cfg, generator_models, vqa_models, tmp_path) -> None:
    side, digest = _run(tiny_cfg, generator_models, vqa_models, tmp_path)
    assert {r["generator"] for r in side} == {"inversion"} and len(side) == 6
    assert all(r["itm_score"] is not None for r in side)
    assert digest == recorded_digest(INVERSION_DIGESTS_AT_43FCEC6, "the inversion path at 43fcec6", digest)


def test_sd_sampling_records_say_so(tiny_cfg, generator_models, vqa_models, tmp_path) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.engine.generator, cfg.sampling.steps = "sd_sampling", 3
    side, digest = _run(cfg, generator_models, vqa_models, tmp_path)
    assert len(side) == 6 and {r["generator"] for r in side} == {"sd_sampling"}
    assert all(r["status"] in ("accepted", "rejected") for r in side)
    assert all(r["iterations"] == 3 and r["itm_score"] is None and r["seconds"] > r["score_seconds"] for r in side)
    cfg.job.samples_per_prompt = 2  # as _run sets it
    inversion = copy.deepcopy(cfg)
    inversion.engine.generator = "inversion"
    assert {r["config_hash"] for r in side} == {cfg.hash()} != {inversion.hash()}
    _, again = _run(cfg, generator_models, vqa_models, tmp_path / "again")
    assert again == digest  # same seeds, same stored bytes


def test_generator_choice_and_the_config_hash() -> None:
    paper = load_config(preset_path("paper"))
    assert paper.engine.generator == "inversion" and paper.sampling.steps == 30
    assert paper.sampling.guidance_scale == 7.5 and paper.sampling.scheduler == "ddim"
    # Inversion: the sampling section is not part of the hash (runs made before it keep theirs).
    assert load_config(preset_path("paper"), ["sampling.steps=50"]).hash() == paper.hash()
    sd15 = load_config(preset_path("sd15"))
    assert sd15.engine.generator == "sd_sampling" and sd15.hash() != paper.hash()
    assert load_config(preset_path("sd15"), ["sampling.steps=50"]).hash() != sd15.hash()
    # Sampling: the inversion-only sections change no image.
    assert load_config(preset_path("sd15"), ["optim.iterations=3", "augment.num_views=2"]).hash() == sd15.hash()
    with pytest.raises(ConfigError, match="engine.generator must be one of inversion, sd_sampling"):
        load_config(None, ["engine.generator=gan"])
    with pytest.raises(ConfigError, match="sampling.scheduler must be one of"):
        load_config(None, ["sampling.scheduler=magic"])


def test_sd_sampling_refills_until_the_target(tiny_cfg, generator_models, vqa_models, tmp_path) -> None:
    """Accept-until-target is the generator's business only through the batches it is given."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.engine.generator, cfg.sampling.steps = "sd_sampling", 2
    cfg.job.target_accepted, cfg.job.max_samples_per_prompt = 2, 4
    cfg.filter.thresholds = {"color": 0.0, "shape": 1.0}
    table = prompt_table([COMPBENCH_DIR / "color_val.txt", COMPBENCH_DIR / "shape_val.txt"], limit=1)
    rows = validate_rows([table], 1, 1000, 128)
    fs, root = filesystem_for(str(tmp_path))
    fs.create_dir(f"{root}/shards", recursive=True)
    stats = ShardProcessor(cfg, generator_models, vqa_models, {"vqa": "tiny"}).process(ShardSpec(0, rows), fs, root)
    side = pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist()
    made = {c: [r["status"] for r in side if r["category"] == c] for c in ("color", "shape")}
    assert made == {"color": ["accepted"] * 2, "shape": ["rejected"] * 4}
    assert stats.categories["shape"]["samples"] == 4 and stats.short[0]["short_by"] == 2
