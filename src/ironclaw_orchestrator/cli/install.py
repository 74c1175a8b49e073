"""``ironclaw install``: install firecracker + jailer from a release archive."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import install as lib
from .common import VerboseOption, handle_errors, setup_logging, stderr, stdout
from .summaries import help_text

HELP = help_text(
    "install",
    f"Installs PREFIX/firecracker-VERSION, PREFIX/jailer and the symlink "
    f"PREFIX/firecracker, and creates the chroot base directory. Before that, each binary "
    f"must be an executable for this arch whose --version names its program and VERSION. "
    f"Nothing is left installed if any step fails (exit 5).\n\n"
    f"Examples:\n\n"
    f"sudo ironclaw install\n\n"
    f"sudo ironclaw install --version v1.14.1 --prefix /opt/firecracker/bin\n\n"
    f"sudo ironclaw install --from ./firecracker-v1.14.1-x86_64.tgz --sha256 "
    f"0123...abcd\n\n"
    f"Default version: {lib.DEFAULT_VERSION}; default prefix: {lib.DEFAULT_PREFIX}.",
)


def install(
    version: Annotated[
        str, typer.Option("--version", help="Release to install, e.g. v1.14.1.")
    ] = lib.DEFAULT_VERSION,
    prefix: Annotated[
        Path, typer.Option("--prefix", help="Directory receiving the binaries.")
    ] = lib.DEFAULT_PREFIX,
    source: Annotated[
        str | None,
        typer.Option("--from", help="Archive to install instead: http(s)/file URL or local path."),
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", help="Expected SHA-256 of the archive (hex)."),
    ] = None,
    chroot_base: Annotated[
        Path, typer.Option("--chroot-base", help="The jailer's chroot base directory.")
    ] = lib.DEFAULT_CHROOT_BASE_DIR,
    verbose: VerboseOption = False,
) -> None:
    if verbose:
        setup_logging(True)
    progress = Progress(
        TextColumn("[bold]downloading[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr.get(),
        transient=True,
    )
    task: TaskID = progress.add_task("archive", total=None)

    def report(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    with handle_errors(), progress:
        result = asyncio.run(
            lib.install_firecracker(
                version,
                prefix,
                source=source,
                sha256=sha256,
                chroot_base_dir=chroot_base,
                progress=report,
            )
        )
    stdout.print(f"[green]installed[/] Firecracker {result.version} ({result.arch})")
    for path in result.installed_paths:
        stdout.print(f"  {escape(str(path))}")
    created = "created" if result.chroot_base_created else "exists"
    stdout.print(f"  chroot base {escape(str(result.chroot_base_dir))} ({created})")
    stdout.print(f"  sha256 {result.sha256} (from {escape(result.sha256_source)})")
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {escape(note)}")
