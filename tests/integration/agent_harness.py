"""Start and stop real host agents (``ironclaw serve`` subprocesses) for integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from ironclaw_orchestrator.detach import reap_supervisors
from ironclaw_orchestrator.gc import collect_garbage
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers

TOKEN = "integration-token-0123456789abcdef"


def probe_body(vm_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "vm_id": vm_id,
        "kernel_path": str(probe_kernel_path(ProbeBehaviour.HALT)),
        "rootfs_path": None,
        "memory_mb": 128,
        "boot_args": PROBE_BOOT_ARGS,
        **extra,
    }


class AgentHarness:
    """One host agent with a private socket, state dir, run dir and chroot base."""

    def __init__(self, name: str = "a", *, tcp_port: int | None = None, extra: Sequence[str] = ()):
        # Short paths: the agent's and each VM's API socket must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix=f"ic14{name}-", dir="/tmp"))
        self.socket = self.root / "agent.sock"
        self.state = self.root / "state"
        self.run = self.root / "run"
        self.jail = self.root / "jail"
        self.jail.mkdir()
        self.token_file = self.root / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.tcp_port = tcp_port
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "agent.log"

    @property
    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "ironclaw_orchestrator.cli",
            "serve",
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state),
            "--run-dir",
            str(self.run),
            "--chroot-base",
            str(self.jail),
            "--image-dir",
            str(probe_kernel_path(ProbeBehaviour.HALT).parent),
            *self.extra,
        ]
        if self.tcp_port is not None:
            argv += ["--tcp", f"127.0.0.1:{self.tcp_port}", "--token-file", str(self.token_file)]
        return argv

    def start(self, timeout_s: float = 60.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if self.client().get("/v1/host").status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"agent did not answer within {timeout_s}s: {self.log.read_text()}")

    def client(self, timeout_s: float = 90.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(transport=transport, base_url="http://agent", timeout=timeout_s)

    def tcp_client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.tcp_port}", headers=headers, timeout=90
        )

    def signal(self, sig: int, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self.proc = None
        return code

    def registry(self) -> Registry:
        return Registry(self.state)

    def leftovers(self) -> list[str]:
        """The agent's own processes and sockets (named after its private dir), and every
        resource of each VM id its jails, records and run dirs still name."""
        ids = {p.name for p in self.jail.glob("*/*")}
        ids |= {p.name.removesuffix(".json") for p in self.state.glob("*.json")}
        ids |= {p.name for p in (self.run / "vms").glob("*")}
        found = self.find(self.root.name)
        for vm_id in sorted(ids):
            found += self.find(vm_id, vm_ids=[vm_id])
        return sorted(set(found))

    def find(self, fragment: str, vm_ids: Sequence[str] = ()) -> list[str]:
        """:func:`leftovers` in this agent's chroot base, run dir and state dir too."""
        return leftovers(
            fragment,
            chroot_bases=(self.jail,),
            run_roots=(self.run,),
            state_dirs=(self.state,),
            vm_ids=vm_ids,
        )

    def supervisors(self) -> list[int]:
        """Pids of live supervisors of this agent's state dir (started, maybe not claimed)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"ironclaw_orchestrator.supervisor" in argv and str(self.state).encode() in argv:
                found.append(int(entry))
        return found

    def teardown(self) -> list[str]:
        """Kill the agent, stop every supervisor it left (starts in flight too), gc, and
        return what remained."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        left: list[str] = []
        # SIGTERM first: a supervisor stops its VM (or cancels its start) and cleans up.
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            pids = self.supervisors()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while self.supervisors() and time.monotonic() < deadline:
                time.sleep(0.05)
        reap_supervisors()
        if self.state.is_dir():
            reg = self.registry()
            ids = [r.vm_id for r in reg.list()]
            if ids:
                report = collect_garbage(
                    reg, vm_ids=ids, chroot_bases=(self.jail,), run_root=self.run, orphan_grace_s=0
                )
                left += [f"{a.kind} {a.name}: {a.error}" for a in report.errors]
            left += self.leftovers()
        left += [f"supervisor pid {p}" for p in self.supervisors()]
        shutil.rmtree(self.root, ignore_errors=True)
        return left


def vm_leftovers(vm_id: str, harness: AgentHarness) -> list[str]:
    return harness.find(vm_id, vm_ids=[vm_id])
