"""Each command's one-line summary: what ``ironclaw --help`` and ``ironclaw vm --help`` list.

The listings are printed from here, so they import none of the commands' modules (each of
those imports the library code its options need). A command's own help text begins with its
summary, taken from here: the line has one home. Keys are the command's words after
``ironclaw``. This module imports nothing.
"""

from __future__ import annotations

__all__ = ["SUMMARIES", "help_text"]

SUMMARIES: dict[str, str] = {
    "doctor": "Check that this host can run jailed Firecracker microVMs.",
    "install": "Download, verify (SHA-256) and install firecracker and jailer from one release.",
    "gc": (
        "Clean up VMs whose owner died (a killed `vm run`, supervisor or program) and "
        "orphaned resources of ours."
    ),
    "serve": (
        "Run the host agent: this host's VMs over an HTTP+JSON API (OpenAPI at /openapi.json)."
    ),
    "vm": "Run microVMs: in the foreground (run) or detached (start, ls, stats, logs, stop).",
    "image": "Prepare root filesystem images.",
    "security": "Host confinement beyond the jailer: AppArmor profiles and SELinux policy modules.",
    "vm run": "Start a microVM, boot it and stream its serial console to stdout until it ends.",
    "vm start": (
        "Start a microVM detached: a supervisor process of its own boots it and keeps it "
        "running after this command returns."
    ),
    "vm ls": "List the VMs in the registry, detached or not.",
    "vm stats": "Show a VM's resource usage, read from its cgroups (jailed VMs only).",
    "vm logs": "Print a VM's serial console (and firecracker's own log lines).",
    "vm stop": "Stop detached VMs and remove everything made for them.",
    "vm exec": (
        "Run a command in a VM's guest (through ironclaw-agent over vsock) and pass its exit "
        "code through; stdout and stderr are streamed as they come."
    ),
    "vm cp": (
        "Copy a file into or out of a VM's guest, verified end to end by SHA-256 and written "
        "atomically. One side is VM_ID:/absolute/guest/path, the other a local path."
    ),
    "vm pause": "Pause a running VM's vCPUs.",
    "vm resume": "Resume a paused VM.",
    "vm snapshot": "Snapshot a running jailed VM into the new directory DIR.",
    "vm restore": (
        "Restore the snapshot in DIR as a new VM in a fresh jail and run it in the foreground, "
        "or detached with -d."
    ),
}


def help_text(command: str, details: str = "") -> str:
    """The help of ``command``: its summary, then ``details`` (paragraphs), if any."""
    summary = SUMMARIES[command]
    return f"{summary}\n\n{details}" if details else summary
