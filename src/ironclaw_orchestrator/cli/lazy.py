"""Command groups whose commands are imported only when they are run.

A command's module pulls in what the command needs (the VM code, pydantic, the registry,
rich tables...); importing every module to run one command cost most of the CLI's start-up.
A group lists its commands in a table, ``name -> "module:attribute"`` (a module of this
package; an empty module is the package itself), and imports a module the first time one of
its commands is looked up::

    COMMANDS = {
        "run": "vm:run:RUN_HELP",  # function ``run`` of cli/vm.py, help text ``RUN_HELP``
        "image": "image:app",      # a typer.Typer of its own: a sub-group
    }

The attribute is a command function (its help is the named module attribute, else its
docstring) or a ``typer.Typer`` (a sub-group, with the help it was declared with).

A group's ``--help`` lists its commands by their one-line summaries (:mod:`.summaries`,
keyed by the group's words and the command's name) without importing them: a stand-in
command that carries only the name and the summary is listed instead of any command not
loaded yet.

Every command loaded here first calls :func:`.startup.end_start_up`: ``cli.main`` pauses the
garbage collector and holds Ctrl-C for the imports and the parsing, and the command's own
work runs with both back as usual.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

import typer
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command_from_info, get_group
from typer.models import CommandInfo

from .startup import end_start_up
from .summaries import SUMMARIES

__all__ = ["LazyCommands", "LazyGroup", "load_command"]


def load_command(name: str, spec: str, *, rich_markup_mode: Any) -> Any:
    """Import ``spec`` (``"module:attribute[:HELP_ATTRIBUTE]"``) and make its click command."""
    module_name, _, rest = spec.partition(":")
    attr, _, help_attr = rest.partition(":")
    if not attr:
        raise ValueError(f"lazy command {name!r}: spec {spec!r} is not 'module:attribute'")
    # An empty module is this package itself (a group declared next to the tables).
    module = importlib.import_module(f"{__package__}.{module_name}" if module_name else __package__)
    target = getattr(module, attr)
    if isinstance(target, typer.Typer):
        group = get_group(target)
        group.name = name
        return _ending_start_up(group)
    info = CommandInfo(
        name=name,
        callback=target,
        help=getattr(module, help_attr) if help_attr else None,
    )
    return _ending_start_up(
        get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode=rich_markup_mode)
    )


def _ending_start_up(command: Any) -> Any:
    """``command`` (and a group's commands) with a callback that first ends the start-up.

    A group's own callback is left alone: it runs before its sub-command is imported. A lazy
    group's commands are wrapped as they load (walking them here would import them all).
    """
    commands = getattr(command, "commands", None)
    if isinstance(commands, LazyCommands):
        return command
    if commands is not None:
        for sub in commands.values():
            _ending_start_up(sub)
    elif command.callback is not None:
        command.callback = _after_start_up(command.callback)
    return command


def _after_start_up(callback: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        end_start_up()
        return callback(*args, **kwargs)

    return run


class LazyCommands(MutableMapping[str, Any]):
    """A group's commands: the table's, loaded on first access, then any added eagerly.

    Its keys never import anything, so listing names (``Did you mean ...?``) stays cheap.
    """

    def __init__(
        self,
        eager: Mapping[str, Any],
        table: Mapping[str, str],
        rich_markup_mode: Any,
        summary_key: str = "",
    ) -> None:
        self._loaded: dict[str, Any] = dict(eager)
        self._table = dict(table)
        self._rich_markup_mode = rich_markup_mode
        self._summary_key = summary_key
        #: Set while the group's help is printed: commands not loaded yet are listed by
        #: their summaries (see the module docstring).
        self.listing = False

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded and self.listing:
            summary = SUMMARIES.get(f"{self._summary_key}{name}")
            if summary is not None:
                return TyperCommand(name=name, help=summary)
        if name not in self._loaded:
            spec = self._table[name]  # KeyError: no such command
            self._loaded[name] = load_command(name, spec, rich_markup_mode=self._rich_markup_mode)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._table.pop(name, None)
        self._loaded.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        # Table order first (the order --help lists), then eager additions.
        yield from self._table
        yield from (name for name in self._loaded if name not in self._table)

    def __len__(self) -> int:
        return len(self._loaded.keys() | self._table.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in self._table


class LazyGroup(TyperGroup):
    """A typer group (``typer.Typer(cls=...)``) that adds :attr:`lazy_commands` on demand.

    Subclass it with the table as a class attribute: typer makes the group itself, so the
    table cannot be a constructor argument.
    """

    lazy_commands: ClassVar[Mapping[str, str]] = {}
    #: The group's words before a command's name in :data:`.summaries.SUMMARIES` (``"vm "``).
    summary_key: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = LazyCommands(
            self.commands, self.lazy_commands, self.rich_markup_mode, self.summary_key
        )

    def format_help(self, ctx: Any, formatter: Any) -> None:
        commands = self.commands
        assert isinstance(commands, LazyCommands)
        commands.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            commands.listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        # Names only: TyperGroup's version walks items(), which would import every module.
        return list(self.commands)
