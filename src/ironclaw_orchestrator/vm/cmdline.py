"""The guest kernel's command line, split the way Linux splits it (pure).

Linux (``lib/cmdline.c: next_arg``) splits its command line at spaces outside double quotes;
a parameter's name is what comes before the first ``=``; a bare ``--`` ends the kernel's
parameters (everything after it goes to init). Deciding whether ``boot_args`` already sets a
parameter, or where to add one, by substring search gets this wrong: ``nfs.skip=1`` contains
``ip=``, and a parameter appended after ``--`` never reaches the kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["KernelParam", "add_param", "has_param", "kernel_params"]

# A parameter: runs of non-space, non-quote characters and quoted strings (a quote left
# open runs to the end of the line, as in the kernel).
_TOKEN = re.compile(r'(?:[^ "]+|"[^"]*"?)+')
_END_OF_PARAMS = "--"


@dataclass(frozen=True)
class KernelParam:
    """One parameter as the kernel sees it: ``name`` and ``value`` (``None``: no ``=``)."""

    name: str
    value: str | None
    #: Where the parameter starts and ends in the command line.
    start: int
    end: int


def _split(cmdline: str) -> tuple[list[KernelParam], int | None]:
    params: list[KernelParam] = []
    for m in _TOKEN.finditer(cmdline):
        text = m.group()
        if text == _END_OF_PARAMS:
            return params, m.start()
        # The kernel drops a leading quote, and the closing one at the very end.
        if text.startswith('"'):
            text = text[1:].removesuffix('"')
        name, eq, value = text.partition("=")
        if eq and value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = value[1:-1]
        params.append(KernelParam(name, value if eq else None, m.start(), m.end()))
    return params, None


def kernel_params(cmdline: str) -> list[KernelParam]:
    """The parameters the kernel itself parses from ``cmdline`` (those before ``--``)."""
    return _split(cmdline)[0]


def _same_name(a: str, b: str) -> bool:
    # The kernel treats '-' and '_' in parameter names as the same character (parameq).
    return a.replace("-", "_") == b.replace("-", "_")


def has_param(cmdline: str, name: str) -> bool:
    """Whether the kernel sees a parameter called ``name`` in ``cmdline``."""
    return any(_same_name(p.name, name) for p in kernel_params(cmdline))


def add_param(cmdline: str, param: str) -> str:
    """``cmdline`` with ``param`` added where the kernel reads it: before a ``--``, if any."""
    _, end = _split(cmdline)
    if end is None:
        return f"{cmdline} {param}" if cmdline.strip() else param
    head, tail = cmdline[:end].rstrip(" "), cmdline[end:]
    return f"{head} {param} {tail}" if head else f"{param} {tail}"
