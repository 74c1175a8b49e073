"""Work per lifecycle of a real jailed VM, counted (never timed): API requests, /proc reads,
OOM-counter reads, jail-path derivations.

Guards the orchestrator's per-VM CPU on the start/stop path (issue 10): each of these was
done more often than needed before (three /proc stat reads, two OOM reads, a dozen jail-path
derivations per VM).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from jailcheck import assert_jailed

from ironclaw_orchestrator import procfs
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import VmConfig, jailer_config, seccomp, start_firecracker
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.cgroups import VmCgroups
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

pytestmark = pytest.mark.integration


async def test_requests_and_proc_reads_per_lifecycle(
    vm_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests: list[tuple[str, str]] = []
    exchanges: list[int] = []  # requests per write (pipelined ones share one)
    real_request_all = FirecrackerApi.request_all

    async def counting_request_all(self: FirecrackerApi, calls: Any, **kw: Any) -> Any:
        result = await real_request_all(self, calls, **kw)
        # Counted once answered: on a loaded host readiness may meet a socket that is bound
        # but not yet listening, and retries (nothing was sent).
        requests.extend((method, path) for method, path, _ in calls)
        exchanges.append(len(calls))
        return result

    stats: list[int] = []
    real_stat = procfs.read_stat

    def counting_stat(pid: int, proc: Path = procfs.PROC) -> procfs.ProcStat | None:
        stats.append(pid)
        return real_stat(pid, proc)

    seccomp_reads: list[int] = []
    real_seccomp = seccomp.read_seccomp_status

    def counting_seccomp(pid: int, proc: Path = Path("/proc")) -> seccomp.SeccompStatus:
        status = real_seccomp(pid, proc)
        seccomp_reads.append(len(status.threads))
        return status

    ooms: list[object] = []
    real_oom = VmCgroups.oom_kills

    def counting_oom(self: VmCgroups) -> int | None:
        ooms.append(self)
        return real_oom(self)

    resolved: list[object] = []
    real_name = jailer_config.real_path

    def counting_name(exec_file: Path | str) -> str:
        resolved.append(exec_file)
        return real_name(exec_file)

    monkeypatch.setattr(FirecrackerApi, "request_all", counting_request_all)
    monkeypatch.setattr(procfs, "read_stat", counting_stat)
    monkeypatch.setattr("ironclaw_orchestrator.vm.hardening.read_seccomp_status",
                        counting_seccomp)  # fmt: skip
    monkeypatch.setattr(VmCgroups, "oom_kills", counting_oom)
    monkeypatch.setattr(jailer_config, "real_path", counting_name)
    cfg = VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.RESET)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
    )
    vm = await start_firecracker(cfg, use_jailer=True, registry=Registry(tmp_path / "state"))
    try:
        assert_jailed(vm)
        # Readiness and the configuration: one request each, pipelined in one exchange.
        assert requests == [("GET", "/"), ("PUT", "/machine-config"), ("PUT", "/boot-source")]
        assert exchanges == [3], exchanges
        # The VMM's identity is read once; the jailer's (it forks the VMM, exits) never.
        # (The registry may read the orchestrator's own start time.)
        assert [pid for pid in stats if pid != os.getpid()] == [vm.pid], stats
        # The exec file's realpath: by the input check and by the start, not per path.
        assert len(resolved) <= 2, resolved
        await vm.start_instance()
        # The seccomp check reads each VMM thread's status once when all are filtered.
        assert len(seccomp_reads) == 1 and seccomp_reads[0] >= 2, seccomp_reads
        assert await vm.wait() == 0
    finally:
        await vm.stop()
    # The guest reset itself: no Ctrl-Alt-Del; InstanceStart was the only other request.
    assert requests[3:] == [("PUT", "/actions")]
    assert exchanges == [3, 1], exchanges
    assert len(ooms) == 1  # read once after the exit: wait() and stop() do not both read it
