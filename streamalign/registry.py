"""The one registry mechanism: named things of one kind (model families, objectives, worlds, buffer formats,
rewards, stage planners, the CLI's commands) with unique names, a listing, and discovery of installed
plug-in packages.

A plug-in package declares entry points in the group ``streamalign.<kind>`` (e.g. ``streamalign.objectives``)
in its ``pyproject.toml``. An entry point names either a module, which registers what it defines when
imported (``@register_objective``, ``register_world(...)``), or an object, registered under the entry point's
name. Discovery runs once per registry, the first time it is listed or asked for a name: only packages
installed into the environment take part (a run folder or buffer never names code to import).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind``: the entry-point group's last part (``streamalign.<kind>``); ``noun`` / `plural`: what items
    are called in messages (``model family`` / ``model families``); `check`: validates a new name (raises);
    `error`: the exception type of an unknown or doubly registered name."""

    def __init__(self, kind: str, noun: str, plural: str | None = None, check: Callable[[str], None] | None = None,
                 error: type[ValueError] = ValueError) -> None:  # fmt: skip
        self.kind, self.noun, self.plural, self.check, self.error = kind, noun, plural or noun + "s", check, error
        self._items: dict[str, T] = {}
        self._discovered = False

    @property
    def group(self) -> str:
        return f"streamalign.{self.kind}"

    def register(self, name: str, item: T, overwrite: bool = False) -> T:
        """Add `item` under `name`; a second, different item under a registered name is refused unless
        `overwrite` (registering the same object again is a no-op: a module imported twice)."""
        if self.check is not None:
            self.check(name)
        known = self._items.get(name)
        if known is not None and known is not item and not overwrite:
            raise self.error(f"{self.noun} {name!r} is already registered (pass overwrite=True to replace it)")
        self._items[name] = item
        return item

    def discover(self) -> None:
        """Load every entry point of the group once (see the module docstring)."""
        if self._discovered:
            return
        self._discovered = True
        for ep in entry_points(group=self.group):
            loaded = ep.load()
            if not isinstance(loaded, ModuleType):
                self.register(ep.name, loaded)

    def get(self, name: str) -> T:
        if name not in self._items:
            self.discover()
        if name not in self._items:
            raise self.error(f"unknown {self.noun} {name!r}: registered {self.plural} are {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        self.discover()
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        self.discover()
        return list(self._items.items())

    def values(self) -> list[T]:
        self.discover()
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)


class Command(NamedTuple):
    """A CLI command: `name` in `group` (None: top level), its run config (the flags; its docstring the
    help), its stage ``"package.module:function"`` (``function(cfg[, out]) -> text`` or
    ``(text, exit code)``, imported when the command runs), ``--out``'s help (None: no ``--out``) and
    default (None: required)."""

    group: str | None
    name: str
    config: Any
    target: str
    out_help: str | None = None
    out_default: str | None = None

    @property
    def key(self) -> str:
        return f"{self.group} {self.name}" if self.group else self.name


# the CLI's commands by "group name" (streamalign.cli registers the built-in ones; a plug-in package's
# module in the entry-point group streamalign.commands registers its own with COMMANDS.register)
COMMANDS: Registry[Command] = Registry("commands", "command")
