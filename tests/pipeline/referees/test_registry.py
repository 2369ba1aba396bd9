"""The referee protocol and registry: every kind resolves to a referee; a new one is one class + one line."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import ConfigError, RefereeSpec
from pipeline.config_loading import load_config
from pipeline.engine.invert import InversionEngine
from pipeline.referees import registry
from pipeline.referees.base import EncodedPrompts, TensorRows, ViewLosses, ZooReferee
from pipeline.referees.blip2 import Blip2Referee, Referee


def test_every_registered_kind_is_a_zoo_referee_of_that_kind() -> None:
    assert set(registry.REFEREE_KINDS) == {"blip2", "clip", "detector"}
    for kind in registry.REFEREE_KINDS:
        cls = registry.referee_class(kind)
        assert issubclass(cls, ZooReferee) and cls.kind == kind


def test_unknown_kinds_and_clashing_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="must be one of blip2, clip, detector"):
        load_config(None, ["zoo.referees=[{kind: sam}]"])
    with pytest.raises(ConfigError, match="repeats the name 'clip'"):
        load_config(None, ["zoo.referees=[{kind: clip}, {kind: clip, weight: 2}]"])
    ok = load_config(None, ["zoo.referees=[{kind: clip}, {kind: clip, name: clip-b}]"])
    assert [s.name or s.kind for s in ok.zoo.referees] == ["clip", "clip-b"]


class DarkReferee(ZooReferee):
    """A referee in a dozen lines: prefers dark images (loss = mean normalised pixel value)."""

    kind = "dark"
    image_size = 16

    def encode(self, prompts):
        return EncodedPrompts(TensorRows({"n": torch.zeros(len(prompts))}), [None] * len(prompts))

    def losses(self, pixels, rows):
        return ViewLosses(pixels.float().mean(dim=(1, 2, 3)))

    def match(self, losses):
        return torch.sigmoid(-losses.total)


def test_a_new_referee_is_one_class_plus_one_registry_line(generator_models, tiny_cfg, monkeypatch) -> None:
    monkeypatch.setitem(registry.REFEREE_KINDS, "dark", registry.RefereeKind(f"{__name__}:DarkReferee", ""))
    cfg = copy.deepcopy(tiny_cfg)
    cfg.zoo.referees = [RefereeSpec(kind="dark")]
    load_config(None, ["zoo.referees=[{kind: dark}]"])  # the config accepts it too
    eng = InversionEngine(generator_models, cfg)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    text = eng.zoo.encode(["a red car"], ["color"], z.device)
    g, raw, losses = eng._zoo_grad_once(z, text, [7], 0, g_sds=torch.ones_like(z))
    # a step against the gradient darkens the image: the referee steers the latents
    with torch.no_grad():
        before = eng._decode(z).mean()
        after = eng._decode(z - 0.05 * raw / raw.norm()).mean()
    assert float(after) < float(before) and set(losses.by_name) == {"dark"}


def test_blip2_referee_wraps_the_engines_referee_with_its_numbers(generator_models, tiny_cfg) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.zoo.referees = [RefereeSpec(kind="blip2")]
    eng = InversionEngine(generator_models, cfg)
    wrapper = eng.zoo.referees[0]
    assert isinstance(wrapper, Blip2Referee) and isinstance(wrapper.referee, Referee)
    assert wrapper.referee is eng.referee and wrapper.image_size == eng.referee.image_size
    prompts = ["a red car", "a blue cube and a green bowl"]
    pixels = torch.randn(2, 3, wrapper.image_size, wrapper.image_size, generator=torch.Generator().manual_seed(1))
    enc = wrapper.encode(prompts)
    assert enc.skipped == [None, None]
    got, want = wrapper.losses(pixels, enc.rows), eng.referee.losses(pixels, eng.referee.encode(prompts))
    assert torch.equal(got.total, want.total) and torch.equal(got.parts["itm"], want.itm)
    assert torch.equal(got.parts["caption"], want.caption)
    assert torch.equal(wrapper.match(got), want.match_probability)


def test_coverage_warns_of_a_category_typo_and_of_prompts_no_referee_judges() -> None:
    """Issue 33, class 16: both are said before the run, not only in each record's referee_skipped."""
    specs = [RefereeSpec(kind="blip2", categories=["colour"]), RefereeSpec(kind="detector", categories=["spatial"])]
    lines = registry.coverage_warnings(specs, {"color": 3, "spatial": 2})
    assert len(lines) == 2
    assert "zoo.referees[0] (blip2) lists categories no prompt has: 'colour' (a typo?)" == lines[0]
    assert lines[1] == "3 prompts are judged by no zoo referee (SDS alone): categories color (3)"
    every = [RefereeSpec(kind="blip2"), RefereeSpec(kind="detector", categories=["spatial"])]
    assert registry.coverage_warnings(every, {"color": 3, "spatial": 2}) == []
    muted = [RefereeSpec(kind="blip2", weight=0.0), RefereeSpec(kind="clip", categories=["color"])]
    assert registry.coverage_warnings(muted, {"color": 1, None: 2}) == [
        "2 prompts are judged by no zoo referee (SDS alone): categories (none) (2)"]
