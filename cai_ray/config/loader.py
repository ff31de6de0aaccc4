"""The config loader: one YAML file + dotted ``key=value`` overrides, validated strictly.

Every field has help text (``setting(default, help)``), shown by ``--help``. Unknown keys are
errors with a suggestion; values of the wrong type are errors, never coerced (an int may
stand for a float, nothing else). Config classes are frozen dataclasses: a job's config, and
every section of it a Ray worker or replica receives, cannot change after it was validated.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-3`` (no dot) as a string; learning rates are written that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def setting(default, help: str):
    """A scalar field with its help text (shown by ``--help`` and ``describe``)."""
    return field(default=default, metadata={"help": help})


def positive(where: str, key: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {value!r}")


# ---------------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, dict):
        return str(tp).replace("typing.", "")
    if args:
        return " | ".join("null" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def from_dict(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a nested dict: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = _renamed_keys(cls, data, where)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; known: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            # a partial section starts from the section's own defaults (a factory may set
            # them: LabelConfig.policy has model ""), not from the section class's
            f = fields[key]
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if isinstance(value, dict):
                value = _renamed_keys(tp, value, path)  # the keys given, under their current names
            kwargs[key] = from_dict(tp, value, path)
            if base is not None:
                kwargs[key] = dataclasses.replace(base, **{k: getattr(kwargs[key], k) for k in value})
        elif not _type_ok(value, tp):
            raise ConfigError(f"config key {path!r} expects {_type_name(tp)}, got {value!r}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _renamed_keys(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
    """A config's ``DEPRECATED`` keys ({old: (new dotted keys)}) moved to their new places,
    with a deprecation message each: files users wrote keep working for a release. Giving
    an old key and its new one both is an error (which should win is not ours to guess)."""
    renamed = getattr(cls, "DEPRECATED", {})
    if not any(k in data for k in renamed):
        return data
    import copy
    import logging

    data = copy.deepcopy(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        value = data.pop(old)
        at = f"{where}.{old}" if where else old
        for dotted in new:
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key {at!r} (deprecated): {part!r} is not a section")
            if leaf in node:
                raise ConfigError(f"config keys {at!r} (deprecated) and {dotted!r} both given; keep {dotted!r}")
            node[leaf] = value
        logging.getLogger("cai_ray.config").warning(
            "config key %r is deprecated and will be removed in the next release; use %s", at, " and ".join(new)
        )
    return data


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], dotted: str) -> None:
    """``a.b=value`` into a nested dict; the value is parsed as YAML (1, 0.5, true, null)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r}: expected key=value")
    key, raw = dotted.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {dotted!r}: empty key")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted!r}: cannot parse value: {e}") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    cls, path: str | Path | None = None, overrides: list[str] | tuple = (), flags: dict[str, Any] | None = None
):
    """defaults < YAML file < CLI flags < dotted overrides; then ``validate()``."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = _yaml(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    for key, value in (flags or {}).items():
        if value is not None:
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(cls, data)
    cfg.validate()
    check_job_paths(cfg)
    return cfg


def submitted_job() -> dict[str, Any] | None:
    """The Ray job this process is the driver of (`ray job submit`), else None: its
    submission id and working_dir, from the environment Ray's job supervisor sets."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        job = json.loads(raw)
    except ValueError:
        return None
    return {
        "submission_id": (job.get("metadata") or {}).get("job_submission_id"),
        "working_dir": (job.get("runtime_env") or {}).get("working_dir"),
    }


def check_job_paths(cfg) -> None:
    """In a submitted job the working directory is Ray's temporary copy of the submitter's
    folder: a relative output would land there, out of the user's sight, and vanish with the
    session. Refuse it before any work starts."""
    job = submitted_job()
    if not job or not job["working_dir"]:
        return
    paths = [("output", getattr(cfg, "output", None))]
    if hasattr(cfg, "checkpoint"):
        paths.append(("checkpoint.storage", cfg.checkpoint.storage))
    for key, value in paths:
        if value and "://" not in value and not Path(value).is_absolute():
            raise ConfigError(
                f"{key}={value!r} is relative: in a submitted Ray job (working_dir upload) it would be "
                f"written inside the job's temporary copy of the working dir and lost; give an absolute "
                f"path every node can reach, e.g. {key}=$PWD/{value} on a local cluster or a shared mount"
            )
    for key in ("input", "data", "gold"):
        value = getattr(cfg, key, None)
        if value and "://" not in value and not Path(value).is_absolute() and not Path(value).exists():
            raise ConfigError(
                f"{key}={value!r} is not in the job's working dir (outputs of earlier jobs are not uploaded "
                f"with it); give the absolute path every node can reach, e.g. {key}=$PWD/{value}"
            )


def describe(cls, prefix: str = "", defaults=None) -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, nested sections flattened: for --help.
    Defaults are read from a default instance, so a section built by a factory with its
    own defaults (e.g. ``policy: EngineConfig(model="")``) shows those."""
    rows = []
    hints = typing.get_type_hints(cls)
    if defaults is None:
        defaults = cls(**{f.name: "" for f in dataclasses.fields(cls) if _required(f)})
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".", value)
        else:
            rows.append((key, repr(value), f.metadata.get("help", "")))
    return rows


def _required(f) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
