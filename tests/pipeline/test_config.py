from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.config import Config, ConfigError
from pipeline.config_loading import from_dict, load_config, preset_path
from tests.conftest import ROOT


def test_defaults_are_the_papers_numbers() -> None:
    c = Config()
    # Latent and image (DESIGN.md section 3).
    assert (c.latent.channels, c.latent.size, c.latent.scale) == (4, 64, 0.18215)
    # Views.
    a = c.augment
    assert a.num_views == 30 and a.top_k == 0
    assert (a.affine_degrees, a.affine_translate, a.erase_same_on_views) == (30.0, [0.1, 0.1], True)
    assert (a.perspective_distortion, a.perspective_p) == (0.2, 0.4)
    assert (a.jitter_brightness, a.jitter_contrast, a.jitter_saturation, a.jitter_hue, a.jitter_p) == (
        0.1, 0.1, 0.1, 0.1, 0.5,
    )
    assert (a.erasing_scale, a.erasing_ratio, a.erasing_p) == ([0.1, 0.4], [0.3, 3.3], 1.0)
    assert (a.noise_std_max, a.noise_std) == (0.1, 0.2)
    assert a.clip_mean == [0.48145466, 0.4578275, 0.40821073]
    assert a.clip_std == [0.26862954, 0.26130258, 0.27577711]
    # Referee.
    assert (c.referee.max_tokens, c.referee.strip_chars, c.referee.label_smoothing) == (32, '.!"()*#:;~', 0.1)
    # SDS.
    s = c.sds
    assert s.prefix == "A photo exactly contains "
    assert (s.t_min, s.t_max, s.guidance_scale, s.grad_scale) == (50, 949, 30.0, 2.0)
    assert (s.weight_start, s.weight_end, s.normalizer) == (800.0, 400.0, 64 * 64)
    # Update rule.
    o = c.optim
    assert (o.iterations, o.tail_iterations, o.optimizer) == (150, 10, "adam")
    assert (o.lr_start, o.lr_end, o.warmup) == (1.0, 0.5, 10)
    assert (o.betas, o.weight_decay) == ([0.9, 0.999], 5e-4)
    assert (o.ref_to_sds_ratio, o.sds_step, o.noise_std, o.tail_noise_std) == (2.0, 1.0, 0.2, 0.01)
    assert (o.ema_decay, o.ema_restarts) == (0.95, [40, 100])
    # Scoring.
    v = c.vqa
    assert (v.image_size, v.max_questions, v.round_digits) == (480, 8, 4)
    assert v.skip_chunks == ["top", "the side", "the left", "the right"]


def test_paper_preset_is_exactly_the_defaults() -> None:
    assert load_config(preset_path("paper")) == Config()


@pytest.mark.parametrize("name", ["paper", "vlminv", "tiny", "gors", "sd15", "small"])
def test_presets_load(name: str) -> None:
    cfg = load_config(preset_path(name))
    assert isinstance(cfg, Config)


def test_vlminv_preset_is_the_public_code() -> None:
    cfg = load_config(preset_path("vlminv"))
    assert cfg.optim.optimizer == "sgd" and cfg.augment.num_views == 10
    # cutn 10 and aug_topk 10: every view is kept, no hardest-view selection pass
    assert cfg.augment.top_k == 0
    assert cfg.augment.affine_translate == [0.0, 0.1]  # scalar 0.1 under kornia 0.6.12: y only
    assert cfg.augment.erase_same_on_views is True


def test_translate_accepts_one_number_for_both_axes() -> None:
    assert load_config(None, ["augment.affine_translate=0.2"]).augment.affine_translate == [0.2, 0.2]
    assert load_config(None, ["augment.affine_translate=[0, 0.1]"]).augment.affine_translate == [0.0, 0.1]
    with pytest.raises(ConfigError, match="affine_translate"):
        load_config(None, ["augment.affine_translate=[0.1, 0.1, 0.1]"])


def test_yaml_round_trip(tmp_path) -> None:
    cfg = load_config(preset_path("tiny"), ["sds.guidance_scale=12.5", "filter.thresholds={color: 0.9}"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.hash() == cfg.hash()
    assert yaml.safe_load(path.read_text())["sds"]["guidance_scale"] == 12.5


def test_hash_ignores_run_only_keys_but_not_method_keys() -> None:
    base = Config()
    assert load_config(overrides=["job.num_actors=7"]).hash() == base.hash()
    # How the GPU loop is run (checks, memory plan, compile) changes no number; bf16 weight storage does.
    gpu_run = ["engine.check_every=3", "engine.auto_view_chunk=true", "engine.memory_headroom_gib=2",
               "engine.compile_backend=eager", "engine.compile_unet=true"]
    assert load_config(overrides=gpu_run).hash() == base.hash()
    assert load_config(overrides=["engine.cast_weights=bf16"]).hash() != base.hash()
    assert load_config(overrides=["sds.guidance_scale=7.5"]).hash() != base.hash()


def test_override_sets_typed_values() -> None:
    cfg = load_config(overrides=["optim.iterations=12", "sds.prefix='a picture of '", "optim.ema_restarts=[3, 6]"])
    assert cfg.optim.iterations == 12 and cfg.sds.prefix == "a picture of " and cfg.optim.ema_restarts == [3, 6]
    # An integer is accepted where a float is expected.
    assert load_config(overrides=["sds.guidance_scale=7"]).sds.guidance_scale == 7.0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("sds.nope=1", "unknown key 'sds.nope'"),
        ("nosection.key=1", "unknown section 'nosection'"),
        ("optim.iterations=abc", "optim.iterations must be an integer"),
        ("optim.iterations=1.5", "optim.iterations must be an integer"),
        ("optim.iterations=0", "optim.iterations must be >= 1"),
        ("augment.jitter_p=1.5", "augment.jitter_p must be <= 1.0"),
        ("optim.optimizer=rmsprop", "optim.optimizer must be one of adam, sgd"),
        ("models.tiny=maybe", "models.tiny must be true or false"),
        ("augment.erasing_scale=[0.1]", "augment.erasing_scale must have 2 items"),
        ("sds.t_min=960", "sds.t_min must be <= sds.t_max"),
        ("nodot", "--set expects section.key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_yaml_file_is_one_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sds: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_wrong_section_shape() -> None:
    with pytest.raises(ConfigError, match="section 'sds' must be a mapping"):
        from_dict({"sds": 3})


def test_cli_set_error_is_one_line_without_traceback() -> None:
    """An entry point turns a bad --set into one line on stderr and exit code 2."""
    code = (
        "import sys; from jobs.cli import run_main; from pipeline.config_loading import load_config\n"
        "run_main(lambda argv: load_config(overrides=['optim.iterations=-3']) and 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: config: optim.iterations must be >= 1, got -3"]


@pytest.mark.parametrize("override", [
    "optim.lr_start=.nan", "filter.default_threshold=.nan", "sds.guidance_scale=.inf",
    "filter.thresholds={color: .nan}", "augment.clip_std=[.nan, 0.2, 0.2]", "job.lease_stale_s=-.inf",
])
def test_nan_and_infinities_are_refused_everywhere(override) -> None:
    with pytest.raises(ConfigError, match="finite number"):
        load_config(None, [override])


@pytest.mark.parametrize(("override", "needle"), [
    ("job.samples_per_prompt=100", "job.samples_per_prompt must be <= 99"),
    ("job.shard_size=100000", "job.shard_size must be <= 99999"),
])
def test_flags_beyond_the_sample_key_are_refused(override, needle) -> None:
    from schemas.prompts import MAX_SAMPLES_PER_PROMPT
    from schemas.samples import MAX_SHARD_SIZE

    assert (MAX_SAMPLES_PER_PROMPT, MAX_SHARD_SIZE) == (99, 99999)  # the config's bounds say the same
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_a_utf16_or_unreadable_config_is_one_line(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  iterations: 3\n", encoding="utf-16")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)
    path.write_text("\ufeffoptim:\n  iterations: 3\n", encoding="utf-8")  # a BOM is fine
    assert load_config(path).optim.iterations == 3


def test_presets_layer_key_by_key_and_zoo_is_an_overlay() -> None:
    cfg = load_config([preset_path("tiny"), preset_path("zoo")], ["optim.iterations=3"])
    assert cfg.models.tiny and cfg.augment.num_views == 4 and cfg.optim.iterations == 3  # tiny's, then --set
    kinds = [(s.kind, s.categories) for s in cfg.zoo.referees]
    assert kinds == [("blip2", []), ("clip", []), ("detector", ["spatial"])]
    alone = load_config(preset_path("zoo"))
    assert alone.models.tiny is False and alone.optim.iterations == 150 and alone.zoo == cfg.zoo


def test_an_empty_zoo_leaves_the_hash_of_a_run_made_before_it() -> None:
    base = Config()
    assert load_config(overrides=["zoo.balance=total", "zoo.detector_margin=0.2"]).hash() == base.hash()
    assert load_config(overrides=["zoo.referees=[{kind: blip2}]"]).hash() != base.hash()


# ---- issue 33: bounded echoes, a depth limit, numbers in scientific notation, bounded zoo views ---------------

def _alias_bomb(key_path: str) -> str:
    """A ~400-byte YAML whose value expands to 9^9 strings (a 'billion laughs')."""
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        parts.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    section, key = key_path.split(".")
    return f"{section}:\n  {key}: [" + ", ".join(parts) + "]\n"


@pytest.mark.parametrize("key", ["job.seed", "filter.default_threshold", "models.vqa", "engine.autocast"])
def test_an_alias_bomb_is_refused_with_a_short_message(tmp_path, key) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(key))
    assert path.stat().st_size < 500
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"config: {key} must be") and len(str(err.value)) < 300


def test_a_config_nested_thousands_deep_is_one_line(tmp_path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("job:\n  seed: " + "[" * 3000 + "]" * 3000 + "\n")  # 6 KB
    with pytest.raises(ConfigError, match="nests deeper than"):
        load_config(path)
    with pytest.raises(ConfigError, match="nests deeper than"):
        load_config(None, ["job.seed=" + "[" * 3000 + "]" * 3000])
    with pytest.raises(ConfigError, match="nests deeper than"):
        load_config(None, ["job." + ".".join(["k"] * 3000) + "=1"])
    path.write_text("job:\n  seed: " + "[" * 40 + "]" * 40 + "\n")  # shallow enough to load, still refused
    with pytest.raises(ConfigError, match="nests deeper than"):
        load_config(path)


def test_huge_keys_and_values_are_echoed_cut() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["job." + "k" * 100_000 + "=1"])
    assert "k" * 100 not in str(err.value) and "unknown key 'job.kkk" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["job.seed=" + "x" * 100_000])
    assert len(str(err.value)) < 300


@pytest.mark.parametrize(("override", "key", "value"), [
    ("filter.default_threshold=1e-05", "filter.default_threshold", 1e-05),
    ("cost.gpu_hour_price=1e16", "cost.gpu_hour_price", 1e16),
    ("sampling.guidance_scale=1e6", "sampling.guidance_scale", 1e6),
    ("sampling.guidance_scale=2.5E+1", "sampling.guidance_scale", 25.0),
    (f"filter.default_threshold={0.00001}", "filter.default_threshold", 1e-05),  # str(float), as flags become --set
])
def test_numbers_in_scientific_notation_are_numbers(override, key, value) -> None:
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == value


def test_a_number_as_text_that_is_no_number_is_still_refused() -> None:
    for text in ("1e", "e5", "1.2.3", "0x10", "nan"):
        with pytest.raises(ConfigError, match="must be a"):
            load_config(None, [f"sampling.guidance_scale={text!r}"])


def test_views_are_bounded_for_the_engine_and_every_zoo_referee() -> None:
    from pipeline.config import MAX_VIEWS

    with pytest.raises(ConfigError, match=rf"zoo.referees\[0\].views must be <= {MAX_VIEWS}, got 100000"):
        load_config(None, ["zoo.referees=[{kind: clip, views: 100000}]"])
    with pytest.raises(ConfigError, match=f"augment.num_views must be <= {MAX_VIEWS}"):
        load_config(None, ["augment.num_views=100000"])
    assert load_config(None, [f"zoo.referees=[{{kind: clip, views: {MAX_VIEWS}}}]"]).zoo.referees[0].views == MAX_VIEWS
