"""Command-line flags generated from a run config: one option per leaf field (help and default from the
field, one help panel per section), ``--run-config FILE`` to start from a file, flags overriding fields."""

from __future__ import annotations

import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ..schemas.run import RunConfig, describe, leaves

RunConfigOpt = Annotated[
    Path | None, typer.Option("--run-config", help="Start from this run file (e.g. a run's run.yaml); flags override.")
]


PANELS = {"lora": "LoRA", "eval": "Evaluation"}  # help panel titles of sections (default: the field's name)


def _strip_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def choices(info: FieldInfo) -> tuple[str, ...] | None:
    """The values a field accepts when they are a fixed set: a Literal, or a validated name with an enum."""
    ann = _strip_optional(info.annotation)
    if typing.get_origin(ann) is Literal:
        return tuple(str(a) for a in typing.get_args(ann))
    for meta in info.metadata:
        enum = (getattr(meta, "json_schema", None) or {}).get("enum")
        if enum:
            return tuple(enum)
    return None


def _completer(values: tuple[str, ...]) -> Callable[[str], list[str]]:
    def complete(incomplete: str) -> list[str]:  # shell completion of a choice flag
        return [v for v in values if v.startswith(incomplete)]

    return complete


def _flag_type(info: FieldInfo, lines: bool) -> tuple[Any, Callable[[Any], Any]]:
    """(the type typer parses, a converter to the field's value). Choices stay strings here: the config
    validates them, so a wrong value is one line naming the field."""
    ann = _strip_optional(info.annotation)
    if choices(info) is not None:
        return str, lambda v: v
    origin = typing.get_origin(ann)
    if lines:
        return Path, read_lines
    if origin is list:
        return list[str], list
    if origin in (tuple, dict):  # tuples: comma-separated; dicts: a=1,b=2 (parsed by the section)
        return str, (lambda v: tuple(x.strip() for x in v.split(",") if x.strip())) if origin is tuple else str
    return ann, lambda v: v


def read_lines(path: Path) -> tuple[str, ...]:
    """Non-empty stripped lines of a text file; one clear error for a missing, empty or undecodable file."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"prompt file {path}, line {line}: not UTF-8 text (save it as UTF-8)") from None
    texts = tuple(s.strip() for s in text.splitlines() if s.strip())
    if not texts:
        raise ValueError(f"prompt file {path} has no prompts")
    return texts


def config_flags(cls: type[RunConfig]) -> tuple[list[inspect.Parameter], dict[str, Callable]]:
    """typer parameters for every leaf of `cls` (default None = not given) and their converters."""
    params, convert = [], {}
    for name, path, info, _ in leaves(cls):
        extra = info.json_schema_extra or {}
        typ, conv = _flag_type(info, bool(extra.get("lines")))
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        if typ is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        names = [flag, *([extra["short"]] if "short" in extra else [])]
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, (), [], "") or isinstance(default, BaseModel) else f" (default: {default})"
        panel = PANELS.get(path[0], path[0].capitalize()) if len(path) > 1 else None
        allowed = choices(info)
        completion = {"metavar": "[" + "|".join(allowed) + "]", "autocompletion": _completer(allowed)} \
            if allowed else {}  # fmt: skip
        if extra.get("argument"):
            option = typer.Argument(help=info.description, show_default=False, **completion)
        else:
            option = typer.Option(*names, help=(info.description or "") + shown, show_default=False,
                                  rich_help_panel=panel, **completion)  # fmt: skip
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[typ | None, option]))  # fmt: skip
        convert[name] = conv
    return params, convert


def stage_command(app: typer.Typer, name: str, config: type[RunConfig]) -> Callable:
    """Register ``fn(cfg, **own)`` as command `name`: its own parameters (e.g. ``out``) plus
    ``--run-config`` plus one flag per leaf of `config`; fn receives the validated config."""

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "cfg"]
        flags, convert = config_flags(config)

        @functools.wraps(fn)
        @clear_errors
        def command(**kwargs: Any) -> Any:
            run_file = kwargs.pop("run_config")
            given = {k: convert[k](kwargs.pop(k)) for k in list(convert) if kwargs.get(k) is not None}
            for k in list(convert):
                kwargs.pop(k, None)
            return fn(config.build(run_file, **given), **kwargs)

        kw = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        run = inspect.Parameter("run_config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunConfigOpt)
        params = [*kw, run, *flags]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        return app.command(name, help=fn.__doc__)(command)

    return decorate


def clear_errors(fn: Callable) -> Callable:
    """Turn expected user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, ValueError) as e:  # CheckpointError, RewardError, SchemaError are ValueErrors
            from pydantic import ValidationError

            if isinstance(e, ValidationError) and e.errors():
                msg = describe(e)
            else:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper
