"""``ironclaw image ...``: prepare root filesystem images (``add-agent``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..agent.image import add_agent as _add_agent
from .common import handle_errors, stderr, stdout
from .summaries import help_text

ADD_AGENT_HELP = (
    "Install the guest agent (ironclaw-agent) into an ext2/3/4 root filesystem image, with "
    "debugfs (e2fsprogs): no loop mount. With systemd in the image its unit is installed and "
    "enabled; the guest needs Python 3 and a kernel with virtio-vsock. Do not run it on an "
    "image a VM is using.\n\n"
    "Example:\n\n"
    "  ironclaw image add-agent rootfs.ext4"
)

app = typer.Typer(
    help=help_text("image", "Example:\n\n  ironclaw image add-agent rootfs.ext4"),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command(name="add-agent", help=ADD_AGENT_HELP)
def add_agent(
    rootfs: Annotated[Path, typer.Argument(metavar="ROOTFS", help="ext4 image to modify.")],
    systemd: Annotated[
        bool | None,
        typer.Option(
            "--systemd/--no-systemd",
            help="Install and enable the systemd unit (default: when the image has systemd).",
            show_default=False,
        ),
    ] = None,
) -> None:
    with handle_errors():
        done = _add_agent(rootfs, systemd=systemd)
    for path in done.files:
        stdout.print(f"  {path}")
    if done.systemd_enabled:
        stdout.print(f"ironclaw-agent installed in {rootfs} and enabled (systemd).")
    else:
        stdout.print(
            f"ironclaw-agent installed in {rootfs}; no systemd: have your init run "
            "/usr/local/bin/ironclaw-agent (it listens on vsock port 5252)."
        )
    if not done.python_found:
        stderr.print(
            "[yellow]warning: no python3 found in the image (/usr/bin/python3, "
            "/usr/local/bin/python3): the agent needs Python 3.7+ in the guest[/]"
        )
