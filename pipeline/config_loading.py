"""Reading a configuration: YAML presets layered in order, ``--set`` overrides, every value checked against
its field's type and range, and the cross-field rules. What the settings are (the typed sections, their
defaults and the config hash) is ``pipeline/config.py``.

Every problem is a ``ConfigError`` whose message is one line naming the key and what was expected; values
echoed in it are cut (a YAML alias bomb expands to gigabytes).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import CASCADE, CONFIG_VERSION, GENERATORS, Config, ConfigError, JobConfig, ZooConfig
from pipeline.referee_kinds import REFEREE_KINDS

# How deep a config's values may nest (the deepest real one is zoo.referees[i].categories: 4); deeper
# input is refused before anything recurses over it.
MAX_DEPTH = 16
# An echoed value is cut to this many characters (a YAML alias bomb expands to gigabytes).
_SHOW_CHARS = 80


def _show(value: Any) -> str:
    """A bounded repr for error messages: never more than _SHOW_CHARS characters, whatever the value."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 2, 4, 4, 4, 4
    short.maxstring, short.maxother, short.maxlong = _SHOW_CHARS, _SHOW_CHARS, 40
    text = short.repr(value)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS - 3] + "..."


def _cut(text: Any) -> str:
    """A user's key as text, cut to _SHOW_CHARS characters (keys are echoed unquoted)."""
    text = str(text)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS - 3] + "..."


def _check_depth(data: Any, where: str) -> None:
    """Refuse values nested deeper than MAX_DEPTH (iteratively: the check itself never recurses). Shared
    nodes (YAML aliases) are visited once, so a small alias bomb costs little here."""
    stack, seen = [(data, 0)], set()
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list, tuple)) or id(node) in seen:
            continue
        if depth >= MAX_DEPTH:
            raise ConfigError(f"config: {where} nests deeper than {MAX_DEPTH} levels")
        seen.add(id(node))
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)


def _safe_load(text: str, where: str) -> Any:
    """yaml.safe_load with its recursion (a few thousand levels in a small file) turned into one line."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"config: {where} nests deeper than {MAX_DEPTH} levels") from None
    _check_depth(data, where)
    return data


# A number as text: YAML 1.1 reads 1e-05 or 1e6 (no dot, or no sign in the exponent) as strings, and flags
# reach the config as str(float) text, which writes 0.00001 as 1e-05.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_scalar(key: str, value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config: {key} must be true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config: {key} must be an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN passes every comparison; infinities no range means
                raise ConfigError(f"config: {key} must be a finite number, got {_show(value)}")
            return float(value)
        raise ConfigError(f"config: {key} must be a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config: {key} must be a string, got {_show(value)}")
    raise ConfigError(f"config: {key} has unsupported type {_type_name(tp)}")


def _check_bounds(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"config: {key} must be one of {', '.join(choices)}, got {_show(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(f"config: {key} must be >= {lo}, got {_show(value)}")
        if hi is not None and value > hi:
            raise ConfigError(f"config: {key} must be <= {hi}, got {_show(value)}")


def _check_value(key: str, value: Any, tp: Any, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item_tp):  # a list of mappings, each a small section (zoo.referees)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config: {key} must be a list of mappings, got {_show(value)}")
            return [v if isinstance(v, item_tp) else _build_section(f"{key}[{i}]", item_tp, v)
                    for i, v in enumerate(value)]
        if meta.get("broadcast") and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * meta["length"]  # one number for every item (e.g. both translate axes)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {key} must be a list of {_type_name(item_tp)}, got {_show(value)}")
        length = meta.get("length")
        if length is not None and len(value) != length:
            raise ConfigError(f"config: {key} must have {length} items, got {len(value)}")
        items = [_check_scalar(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
        for i, v in enumerate(items):
            _check_bounds(f"{key}[{i}]", v, meta)
        return items
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a mapping, got {_show(value)}")
        out = {}
        for k, v in value.items():
            out[str(k)] = _check_scalar(f"{key}.{_cut(k)}", v, val_tp)
            _check_bounds(f"{key}.{_cut(k)}", out[str(k)], meta)
        return out
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config: {key} has unsupported type {tp}")
    checked = _check_scalar(key, value, tp)
    _check_bounds(key, checked, meta)
    return checked


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config: section '{name}' must be a mapping, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"config: unknown key '{_cut(f'{name}.{key}')}' (known keys: {known})")
        kwargs[key] = _check_value(f"{name}.{key}", value, hints[key], fields[key].metadata)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested mapping (a partial one is fine) and build a Config."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: top level must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    data = _expand_auto_stages(data)
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"config: unknown section '{_cut(name)}' (known: {', '.join(sections)})")
        if name == "version":
            if values != CONFIG_VERSION:
                raise ConfigError(f"config: version must be {CONFIG_VERSION}, got {_show(values)}")
            continue
        kwargs[name] = _build_section(name, hints[name], values)
    cfg = Config(**kwargs)
    _check_cross_fields(cfg)
    return cfg


def _expand_auto_stages(data: dict[str, Any]) -> dict[str, Any]:
    """``cascade.stages: auto`` -> auto true with sd_sampling then inversion, each up to the job's
    max_samples_per_prompt (the stage-1 budget per category is chosen below that)."""
    cascade = data.get("cascade")
    if not isinstance(cascade, dict) or cascade.get("stages") != "auto":
        return data
    job = data.get("job") if isinstance(data.get("job"), dict) else {}
    most = job.get("max_samples_per_prompt", JobConfig.max_samples_per_prompt)
    stages = [{"generator": g, "max_samples": most} for g in GENERATORS[::-1]]  # sd_sampling, then inversion
    return {**data, "cascade": {**cascade, "stages": stages, "auto": True}}


def _check_cross_fields(cfg: Config) -> None:
    unknown = sorted(set(cfg.filter.inferred) - set(cfg.filter.thresholds))
    if unknown:
        raise ConfigError(f"config: filter.inferred names {', '.join(unknown)[:200]}, which filter.thresholds "
                          "does not set (a reason needs its threshold)")
    if cfg.models.tiny and cfg.models.small:
        raise ConfigError("config: models.tiny and models.small cannot both be true (pick one model set)")
    if cfg.sds.t_min > cfg.sds.t_max:
        raise ConfigError(f"config: sds.t_min must be <= sds.t_max, got {cfg.sds.t_min} > {cfg.sds.t_max}")
    if cfg.augment.top_k > cfg.augment.num_views:
        raise ConfigError(
            f"config: augment.top_k must be <= augment.num_views ({cfg.augment.num_views}), got {cfg.augment.top_k}"
        )
    if cfg.job.lease_stale_s <= 2 * cfg.job.lease_heartbeat_s:
        raise ConfigError(
            f"config: job.lease_stale_s must exceed 2 x job.lease_heartbeat_s ({cfg.job.lease_heartbeat_s}), "
            f"got {cfg.job.lease_stale_s}"
        )
    if cfg.job.target_accepted > cfg.job.max_samples_per_prompt and cfg.engine.generator != CASCADE:
        raise ConfigError(
            f"config: job.target_accepted must be <= job.max_samples_per_prompt ({cfg.job.max_samples_per_prompt}), "
            f"got {cfg.job.target_accepted}"
        )
    lo, hi = cfg.augment.erasing_scale
    if lo > hi:
        raise ConfigError(f"config: augment.erasing_scale must be [low, high] with low <= high, got {[lo, hi]}")
    _check_zoo(cfg.zoo)
    _check_cascade(cfg)
    if cfg.sampling.lora and cfg.engine.generator != "sd_sampling":  # a cascade's stages share one UNet
        raise ConfigError("config: sampling.lora needs engine.generator sd_sampling (--generator sd_sampling)")
    if cfg.monitor.enabled and cfg.engine.generator != "inversion":
        raise ConfigError(
            f"config: monitor.enabled needs engine.generator inversion (it watches the optimisation), "
            f"got {cfg.engine.generator!r}")


def _check_cascade(cfg: Config) -> None:
    stages = cfg.cascade.stages
    if cfg.engine.generator != CASCADE:
        if stages or cfg.cascade.auto or cfg.cascade.first_stage_by_category:
            raise ConfigError(f"config: cascade.stages needs engine.generator cascade (--generator cascade), "
                              f"got engine.generator {cfg.engine.generator!r}")
        return
    if not stages:
        raise ConfigError("config: engine.generator cascade needs cascade.stages, e.g. "
                          "[{generator: sd_sampling, max_samples: 8}, {generator: inversion, max_samples: 4}]")
    seen = set()
    for i, stage in enumerate(stages):
        if stage.generator not in GENERATORS:
            raise ConfigError(f"config: cascade.stages[{i}].generator must be one of {', '.join(GENERATORS)}, "
                              f"got {_show(stage.generator)}")
        if stage.generator in seen:
            raise ConfigError(f"config: cascade.stages[{i}] repeats the generator {stage.generator} "
                              "(give it one stage with the budget summed)")
        seen.add(stage.generator)
    total = sum(stage.max_samples for stage in stages)
    if total > 99:
        raise ConfigError(f"config: cascade.stages' max_samples sum to {total}; at most 99 per prompt "
                          "(the sample index has two digits in the key)")
    if not cfg.job.target_accepted:
        raise ConfigError("config: engine.generator cascade needs job.target_accepted > 0 (--target-accepted K): "
                          "a prompt moves to the next stage while it is short of its target")
    if cfg.job.target_accepted > total:
        raise ConfigError(f"config: job.target_accepted must be <= the cascade's attempts per prompt "
                          f"(cascade.stages' max_samples summed: {total}), got {cfg.job.target_accepted}")
    if (cfg.cascade.auto or cfg.cascade.first_stage_by_category) and len(stages) < 2:
        raise ConfigError("config: cascade.auto and cascade.first_stage_by_category need at least two cascade.stages "
                          "(they choose the first stage's budget)")
    for name, budget in cfg.cascade.first_stage_by_category.items():
        if budget > stages[0].max_samples:
            raise ConfigError(f"config: cascade.first_stage_by_category.{_cut(name)} must be <= cascade.stages[0]."
                              f"max_samples ({stages[0].max_samples}), got {budget}")


def _check_zoo(zoo: ZooConfig) -> None:
    names = set()
    for i, spec in enumerate(zoo.referees):
        if spec.kind not in REFEREE_KINDS:
            kinds = ", ".join(REFEREE_KINDS)
            raise ConfigError(f"config: zoo.referees[{i}].kind must be one of {kinds}, got {_show(spec.kind)}")
        if spec.kind == "blip2" and spec.model:
            raise ConfigError(
                f"config: zoo.referees[{i}] (blip2) takes its model from models.referee; leave its model empty")
        name = spec.name or spec.kind
        if name in names:
            raise ConfigError(f"config: zoo.referees[{i}] repeats the name {_show(name)} (give each a distinct name)")
        names.add(name)
    if zoo.referees and not any(spec.weight > 0 for spec in zoo.referees):
        raise ConfigError("config: zoo.referees needs at least one referee with weight > 0")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"config: --set expects section.key=value, got {_show(text)}")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"config: --set expects section.key=value, got {_show(text)}")
    if len(keys) > MAX_DEPTH:
        raise ConfigError(f"config: --set {_cut(path)} nests deeper than {MAX_DEPTH} levels")
    try:
        value = _safe_load(raw, f"--set {_cut(path)}") if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"config: --set {_cut(path)} has a value that is not valid YAML: {_show(raw)}") from None
    return keys, value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"config: {p} is not UTF-8 text (save it as UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"config: cannot read {p} ({err.strerror or err})") from None
    try:
        data = _safe_load(text, str(p)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config: {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def layer_presets(paths: typing.Sequence[str | Path]) -> dict[str, Any]:
    """Several presets, later ones winning key by key within a section (a list is replaced whole)."""
    data: dict[str, Any] = {}
    for path in paths:
        for name, values in read_yaml(path).items():
            if isinstance(values, dict) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **values}
            else:
                data[name] = values
    return data


def load_config(path: str | Path | typing.Sequence[str | Path] | None = None,
                overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file(s) (if any; e.g. tiny.yaml then zoo.yaml), then ``section.key=value``
    overrides."""
    paths = [] if not path else [path] if isinstance(path, (str, Path)) else list(path)
    data: dict[str, Any] = layer_presets(paths)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config: --set {_cut('.'.join(keys))}: '{_cut(k)}' is not a section")
            node = child
        node[keys[-1]] = value
    return from_dict(data)


def preset_path(name: str) -> Path:
    """Path of a shipped preset (``paper``, ``vlminv``, ``tiny``, ``gors``)."""
    return Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
