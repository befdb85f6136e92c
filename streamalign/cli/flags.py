"""Command-line flags generated from a run config: one option per leaf field (help and default from the
field, one help panel per section), ``--run-config FILE`` to start from a file, flags overriding fields."""

from __future__ import annotations

import contextlib
import errno
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
from rich.markup import escape

from ..io.files import DISK_FULL
from ..io.outputs import check_output, clear_unused, is_empty, missing_folders, permit_overwrite, remove_unused
from ..schemas.run import RunConfig, describe, flag_name, leaves

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
        flag = flag_name(name, info)
        if typ is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        names = [flag, *([extra["short"]] if "short" in extra else [])]
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, (), [], "") or isinstance(default, BaseModel) else f" (default: {default})"
        panel = PANELS.get(path[0], path[0].capitalize()) if len(path) > 1 else None
        allowed = choices(info)
        completion = {"metavar": "[" + "|".join(allowed) + "]", "autocompletion": _completer(allowed)} \
            if allowed else {}  # fmt: skip
        # help texts are plain text: typer renders them as rich markup, where "[@REV][/PATH]" is a tag
        text = escape((info.description or "") + shown)
        if extra.get("argument"):
            option = typer.Argument(help=text, show_default=False, **completion)
        else:
            option = typer.Option(*names, help=text, show_default=False,
                                  rich_help_panel=panel, **completion)  # fmt: skip
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[typ | None, option]))  # fmt: skip
        convert[name] = conv
    return params, convert


OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace what --out holds when a streamalign command wrote it (collect, train, demo: start "
    "afresh instead of continuing); files no streamalign command wrote are never replaced.")]  # fmt: skip


def stage_command(app: typer.Typer, name: str, config: type[RunConfig], group: str | None = None) -> Callable:
    """Register ``fn(cfg, **own)`` as command `name` (of `group`): its own parameters (e.g. ``out``) plus
    ``--run-config`` plus one flag per leaf of `config`; fn receives the validated config. A command with
    ``out`` also gets ``--overwrite``, and its ``--out`` is checked (``io.outputs.check_output``) before fn
    runs, so before any model loads."""
    command_name = f"{group} {name}" if group else name

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "cfg"]
        flags, convert = config_flags(config)
        writes = any(p.name == "out" for p in own)

        @functools.wraps(fn)
        @clear_errors
        def command(**kwargs: Any) -> Any:
            run_file = kwargs.pop("run_config")
            overwrite = kwargs.pop("overwrite", False) if writes else False  # else a setting (stats --overwrite)
            given = {k: convert[k](kwargs.pop(k)) for k in list(convert) if kwargs.get(k) is not None}
            for k in list(convert):
                kwargs.pop(k, None)
            cfg = config.build(run_file, **given)
            if not writes:
                return fn(cfg, **kwargs)
            out = check_output(kwargs["out"], command_name, overwrite)
            made = missing_folders(kwargs["out"])
            was_empty = out.is_dir() and is_empty(out)
            try:
                with permit_overwrite(kwargs["out"]) if overwrite else contextlib.nullcontext():
                    return fn(cfg, **kwargs)
            except BaseException:  # a failed run leaves no empty folders (nor a marker in an empty one) behind
                remove_unused(made)
                if was_empty:
                    clear_unused(out)
                raise

        kw = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        if writes:
            kw.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False,
                                        annotation=OverwriteOpt))  # fmt: skip
        run = inspect.Parameter("run_config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunConfigOpt)
        params = [*kw, run, *flags]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        return app.command(name, help=fn.__doc__)(command)

    return decorate


# errno of OSErrors that are the user's to fix (a path, permissions, space): one line, no traceback
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EEXIST,
                   errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ENOTEMPTY}  # fmt: skip


def os_error_line(e: OSError, target: object = None) -> str | None:
    """One line for an OSError the user can fix (None for others: a bug or a broken device, keep the
    traceback). Ours carry their own message; the system's name the path (or `target`, the command's
    output, when the system gives none) and what to do."""
    if len(e.args) == 1:
        return str(e)
    if e.errno not in _USER_OS_ERRORS:
        return None
    path = e.filename if e.filename is not None else target
    at = f" {path}" if path is not None else ""
    if e.errno in DISK_FULL:
        return f"no space left on device writing{at}: the disk is full; free some space (or write elsewhere) and re-run"
    if e.errno == errno.EROFS:
        return f"cannot write{at}: read-only file system; write elsewhere"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write{at}: permission denied; choose a folder you can write in"
    return f"{e.strerror}:{at}" if at else str(e.strerror)


def clear_errors(fn: Callable) -> Callable:
    """Turn expected user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:  # CheckpointError, RewardError, SchemaError are ValueErrors
            from pydantic import ValidationError

            if isinstance(e, ValidationError) and e.errors():
                msg = describe(e)
            elif isinstance(e, OSError):
                msg = os_error_line(e, kwargs.get("out") or kwargs.get("output"))
                if msg is None:
                    raise
            else:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {(msg.splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper
