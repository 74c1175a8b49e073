"""The lock-free cgroup prepare against a locked prepare that is filling a v1 cpuset parent."""

from __future__ import annotations

import threading
from pathlib import Path

from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.vm.cgroups import CgroupLayout, VmCgroups, cgroup_settings
from ironclaw_orchestrator.vm.config import JailerConfig

V1 = ("cpu", "cpuacct", "cpuset", "memory")


def _host(root: Path) -> tuple[FakeKernel, CgroupLayout]:
    for c in V1:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("1\n")
    (root / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    fs = FakeKernel(root)
    layout = CgroupLayout(
        mode="v1",
        v1_mounts={c: root / c for c in V1},
        unified_mount=None,
        unified_controllers=frozenset(),
        own_paths={c: "/" for c in V1},
    )
    return fs, layout


def _vm(
    fs: FakeKernel, layout: CgroupLayout, lock: Path, vm_id: str, pinned: bool = True
) -> VmCgroups:
    cfg = JailerConfig(memory_limit_mb=128, cpuset_cpus="0" if pinned else None)
    settings = cgroup_settings(cfg, 1, None)
    return VmCgroups.plan(layout, 1, vm_id, settings, None, lock_path=lock, fs=fs)


def test_lockfree_prepare_sees_a_half_made_cpuset_parent(tmp_path: Path) -> None:
    """A VM without CPU pinning runs (cpu, cpuacct, memory <own>/ironclaw exist; cpuset's
    does not). VM a (locked path) has just made the intermediate cpuset/ironclaw and not yet copied
    its cpus/mems; VM b, whose parent chain now exists, prepares lock-free at that moment.
    b must not fail (the host is fine: the parent is being set up by another orchestrator)."""
    fs, layout = _host(tmp_path / "cg")
    lock = tmp_path / "cg.lock"
    x = _vm(fs, layout, lock, "x", pinned=False)
    x.prepare()
    a, b = _vm(fs, layout, lock, "a"), _vm(fs, layout, lock, "b")
    intermediate = tmp_path / "cg" / "cpuset" / "ironclaw"
    real_write = fs.write
    fired: list[BaseException | None] = []

    def start_b() -> None:
        try:
            b.prepare()
            fired.append(None)
        except BaseException as exc:
            fired.append(exc)

    other = threading.Thread(target=start_b)

    def write(path: Path, value: str) -> None:
        if not other.is_alive() and not fired and path == intermediate / "cpuset.cpus":
            # Another orchestrator's start, between a's mkdir and a's copy; a holds the
            # host lock, b needs none (its parent chain exists) unless it must roll back.
            other.start()
            other.join(timeout=3.0)
        real_write(path, value)

    fs.write = write  # type: ignore[method-assign]
    try:
        a.prepare()
        other.join(timeout=30.0)
        assert fired, "the interleaving point was never reached"
        assert fired[0] is None, f"b's start failed spuriously: {fired[0]}"
    finally:
        for vm in (b, a, x):
            if vm.prepared:
                vm.remove()
