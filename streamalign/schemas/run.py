"""Runs described by files: nested, typed run configs whose every field is reachable from a YAML file
(``--run-config``) or a command-line flag, with each default and help text written once, in the field.

A run config is a tree of :class:`Section` s. Leaf names are unique within one run config, so a flat
mapping ``{"lr": 1e-4, "steps": 40}`` (keyword arguments, flags) is routed to its nested place
(``optim.lr``, ``schedule.steps``). Field metadata for the CLI lives in ``json_schema_extra``:
``flag`` (its name), ``short``, ``lines`` (the flag takes a file whose lines become the value).
Every run writes ``run.yaml``: the resolved config plus the streamalign version, git commit and command
line; ``--run-config run.yaml`` re-runs it.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

RUN_FILE = "run.yaml"


def arg(default: Any = ..., help: str = "", **cli: Any) -> Any:
    """A config field with its help text and CLI metadata (flag, short, lines)."""
    return Field(default, description=help, json_schema_extra=cli or None)


class Section(BaseModel):
    """A component's settings (one help panel on the command line)."""

    # a NaN or infinite number is never a setting (--tau nan, --scales nan,1): refused where it is given
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def section_types(annotation: Any) -> list[type[Section]]:
    """The Section classes an annotation holds: one, a union of several (keyed by ``name``), or none."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return [annotation]
    if typing.get_origin(annotation) is typing.Annotated:
        return section_types(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in section_types(a)]
    return []


def leaves(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, tuple[str, ...], Any, type]]:
    """(leaf name, path, pydantic FieldInfo, owning class) of every leaf field, depth first."""
    for name, info in cls.model_fields.items():
        subs = section_types(info.annotation)
        if not subs:
            yield name, (*prefix, name), info, cls
            continue
        seen = set()
        if len(subs) > 1:  # a union keyed by `name`: one leaf named after the field selects the member
            names = tuple(sub.model_fields["name"].default for sub in subs)
            choice = FieldInfo(annotation=typing.Literal[names], default=names[0], description=info.description)
            yield name, (*prefix, name), choice, cls
            seen.add("name")
        for sub in subs:
            for leaf in leaves(sub, (*prefix, name)):
                if leaf[0] not in seen:  # a field shared by union members (e.g. clip_eps) is one leaf
                    seen.add(leaf[0])
                    yield leaf


def flag_name(name: str, info: FieldInfo) -> str:
    """The command-line flag of a leaf field: its ``flag`` metadata, else ``--name-with-dashes``."""
    return (info.json_schema_extra or {}).get("flag", "--" + name.replace("_", "-"))


class SettingError(ValueError):
    """A validator's message that is already one whole line (what, where, how to fix): shown as it is."""


class UnknownSettingError(ValueError):
    """A key that is no setting of a run config (its message is completed by ``describe``)."""

    def __init__(self, key: str, cls: type[BaseModel]):
        super().__init__(f"unknown setting '{key}'")
        self.key, self.cls = key, cls


def leaf_paths(cls: type[BaseModel]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for name, path, _, _ in leaves(cls):
        if name in out and out[name] != path:
            raise TypeError(f"{cls.__name__}: leaf '{name}' appears at {'.'.join(out[name])} and {'.'.join(path)}")
        out[name] = path
    return out


def route(cls: type[BaseModel], data: dict) -> dict:
    """Nest a flat mapping: keys that are not top-level fields go to their leaf's section."""
    paths = leaf_paths(cls)
    out: dict = {}
    for key, value in data.items():
        if key in cls.model_fields:
            if len(section_types(cls.model_fields[key].annotation)) > 1 and isinstance(value, str):
                value = {"name": value}  # a union section given by its name: objective="nft"
            if isinstance(value, BaseModel):
                value = value.model_dump()
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                value = {**value, **out[key]}
            out[key] = value
            continue
        if key not in paths:
            raise UnknownSettingError(key, cls)
        node = out
        for part in paths[key][:-1]:
            if isinstance(node.get(part), BaseModel):
                node[part] = node[part].model_dump()
            node = node.setdefault(part, {})
        node[paths[key][-1]] = value
    return out


def default_members(cls: type[BaseModel], data: dict) -> dict:
    """A union section given without its ``name`` (``--clip-eps 0.3`` alone) is the field's default member:
    the default objective's flags work without ``--objective``."""
    out = dict(data)
    for key, info in cls.model_fields.items():
        members = section_types(info.annotation)
        default = info.get_default(call_default_factory=True)
        given = out.get(key)
        if len(members) < 2 or not isinstance(given, dict) or "name" in given or not isinstance(default, Section):
            continue
        for leaf in given:  # a flag of another member only: say which --KEY NAME it needs
            if leaf not in type(default).model_fields:
                owners = [m for m in members if leaf in m.model_fields]
                if owners:
                    names = " or ".join(m.model_fields["name"].default for m in owners)
                    flag = flag_name(leaf, owners[0].model_fields[leaf])
                    raise SettingError(f"{flag} is a setting of --{key} {names}, not of the default "
                                       f"{default.name}: add --{key} {names.split(' or ')[0]}")  # fmt: skip
        out[key] = {"name": default.name, **given}
    return out


class RunConfig(Section):
    """A whole run's settings; built from nested data, flat keywords, or a run file plus overrides."""

    @model_validator(mode="before")
    @classmethod
    def _route_flat(cls, data: Any) -> Any:
        return default_members(cls, route(cls, data)) if isinstance(data, dict) else data

    @classmethod
    def build(cls, file: str | Path | None = None, **overrides: Any):
        """The config of a run file (``--run-config``) with single fields overridden; one clear error."""
        data = read_run_file(file) if file is not None else {}
        try:
            if overrides:
                data = merge(route(cls, data), route(cls, overrides))
            return cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(describe(e, file, cls)) from None
        except UnknownSettingError as e:
            raise ValueError(unknown_setting(e.key, e.cls, file)) from None

    def replace(self, **changes: Any):
        """A copy with some leaves (flat names) or sections changed, validated."""
        return type(self).build(None, **{**self.model_dump(), **changes})


def parse_pairs(text: Any, flag: str, what: str = "NAME=VALUE") -> dict[str, str]:
    """'a=x,b=y' (a flag's value) or a mapping (a run file's) -> {'a': 'x', 'b': 'y'}; a malformed part is
    one line naming the flag."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{flag}: {part!r} is not {what}")
        out[key.strip()] = value.strip()
    return out


def merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _suggestion(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_setting(where: str, cls: type[BaseModel] | None, file: str | Path | None = None) -> str:
    """One line for a key that is no setting: the dotted key, the file, the closest known name."""
    src = f" in {file}" if file is not None else ""
    node, names = cls, where.split(".")
    for part in names[:-1]:  # the section the key was given in
        field = node.model_fields.get(part) if node is not None else None
        subs = section_types(field.annotation) if field is not None else []
        node = subs[0] if subs else None
    known = []
    if node is not None:
        known = list(node.model_fields) + ([n for n, _, _, _ in leaves(node)] if len(names) == 1 else [])
    return f"unknown setting '{where}'{src}: check its spelling and section{_suggestion(names[-1], known)}"


def describe(e: ValidationError, file: str | Path | None = None, cls: type[BaseModel] | None = None) -> str:
    """The first error as one line that names the field, its flag (when `cls`, the run config, is given)
    and the file."""
    err = e.errors()[0]
    names = [str(x) for x in err["loc"] if not isinstance(x, int)]
    where = ".".join(names) or "config"
    msg = str(err["msg"]).removeprefix("Value error, ")
    src = f" in {file}" if file is not None else ""
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, UnknownSettingError):
        return unknown_setting(".".join([*names, cause.key]), cause.cls, file)
    if isinstance(cause, SettingError):
        return str(cause)
    if err["type"] == "extra_forbidden":
        return unknown_setting(where, cls, file)
    if err["type"] == "union_tag_invalid":  # e.g. objective: {name: ...}
        return f"unknown {where} '{err['ctx']['tag']}'{src}: choose one of {err['ctx']['expected_tags']}"
    if msg.startswith("--"):  # a validator's own message already names the flag
        return msg
    if not names:  # a check across fields: its message says what to do
        return f"{file}: {msg}" if file is not None else msg
    flags = {n: flag_name(n, info) for n, _, info, _ in leaves(cls)} if cls else {}  # leaf names are unique
    flag = flags.get(names[-1], "--" + names[-1].replace("_", "-"))
    return f"setting '{where}' ({flag}){src}: {msg}"


def read_run_file(file: str | Path) -> dict:
    """A run file's config mapping (a ``run.yaml`` written by a run, or a hand-written YAML)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"run config {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"run config {path}{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"run config {path} is not a YAML mapping")
    return data.get("config", data) if "streamalign" in data else data


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(command: str | None = None) -> dict:
    """Version, git commit and command line (default: ``streamalign`` + this process's arguments)."""
    from .. import __version__

    return {"version": __version__, "git_commit": git_commit(),
            "command": command or " ".join(["streamalign", *sys.argv[1:]])}  # fmt: skip


def run_record(cfg: BaseModel, stage: str) -> str:
    """``run.yaml`` text: provenance (version, git commit, command line) and the resolved config."""
    meta = {"stage": stage, **provenance()}
    return yaml.safe_dump({"streamalign": meta, "config": cfg.model_dump(mode="json")}, sort_keys=False)


def flat_fields(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted name: leaf value}."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, val in data.items():
        out.update(flat_fields(val, f"{prefix}.{key}" if prefix else key))
    return out


def differences(old: BaseModel | dict, new: BaseModel | dict, ignore: set[str] = frozenset(),
                was: str = "was") -> list[str]:  # fmt: skip
    """``name (was X, now Y)`` for every leaf whose value differs between two configs (or JSON mappings),
    sorted by name; ``ignore``: dotted names to skip, ``was``: what to call the old value's source."""

    def show(v: Any) -> str:
        text = "unset" if v is None else json.dumps(v) if isinstance(v, list | dict) else str(v)
        return text if len(text) <= 40 else text[:37] + "..."

    fa, fb = (flat_fields(c.model_dump(mode="json") if isinstance(c, BaseModel) else c) for c in (old, new))
    names = sorted(k for k in fa.keys() | fb.keys() if k not in ignore and fa.get(k) != fb.get(k))
    return [f"{k} ({was} {show(fa.get(k))}, now {show(fb.get(k))})" for k in names]
