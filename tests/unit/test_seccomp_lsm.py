"""Seccomp status from /proc and LSM detection/refusal, on fake trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError, SandboxRequiredError
from ironclaw_orchestrator.lsm import LsmPaths, detect_lsms, require_lsm
from ironclaw_orchestrator.vm.config import JailerConfig
from ironclaw_orchestrator.vm.seccomp import (
    check_filtered,
    check_no_seccomp_allowed,
    kernel_supports_filter,
    read_seccomp_status,
)


def fake_proc(root: Path, pid: int, modes: dict[int, int]) -> Path:
    for tid, mode in modes.items():
        d = root / str(pid) / "task" / str(tid)
        d.mkdir(parents=True)
        (d / "status").write_text(f"Name:\tfc_vcpu 0\nSeccomp:\t{mode}\nSeccomp_filters:\t1\n")
    return root


def test_all_threads_filtered(tmp_path: Path) -> None:
    status = read_seccomp_status(7, fake_proc(tmp_path, 7, {7: 2, 8: 2, 9: 2}))
    assert status.filtered and status.mode == 2
    assert status.summary() == "filter (3 threads)"
    check_filtered(status, "vm1")


def test_one_unfiltered_thread_is_refused(tmp_path: Path) -> None:
    status = read_seccomp_status(7, fake_proc(tmp_path, 7, {7: 2, 8: 0}))
    assert not status.filtered and status.mode == 0 and status.unfiltered_threads == [8]
    with pytest.raises(SandboxRequiredError, match=r"vm1.*pid 7.*threads \[8\]"):
        check_filtered(status, "vm1")


def test_gone_process_reads_as_unknown(tmp_path: Path) -> None:
    status = read_seccomp_status(123, tmp_path)
    assert status.mode is None and not status.filtered and status.summary() == "unknown"


def test_this_process_reads() -> None:
    status = read_seccomp_status(os.getpid())
    assert os.getpid() in status.threads


def test_no_seccomp_refused_in_production_mode() -> None:
    check_no_seccomp_allowed(True, False, "vm1")
    check_no_seccomp_allowed(False, True, "vm1")
    with pytest.raises(ConfigError, match="production mode"):
        check_no_seccomp_allowed(True, True, "vm1")


def test_kernel_support(tmp_path: Path) -> None:
    f = tmp_path / "actions_avail"
    assert kernel_supports_filter(f)[0] is False
    f.write_text("kill_process kill_thread trap errno user_notif trace log allow\n")
    assert kernel_supports_filter(f) == (True, "kill_process kill_thread trap errno user_notif "
                                         "trace log allow")  # fmt: skip


# --------------------------------------------------------------------------- LSMs


def lsm_tree(tmp_path: Path, *, stack: str | None, apparmor: bool, selinux: str | None,
             profiles: str = "") -> LsmPaths:  # fmt: skip
    paths = LsmPaths(
        lsm_list=tmp_path / "lsm",
        apparmor_enabled=tmp_path / "aa_enabled",
        apparmor_profiles=tmp_path / "profiles",
        selinux_enforce=tmp_path / "enforce",
        aa_exec=tmp_path / "aa-exec",
        runcon=tmp_path / "runcon",
    )
    if stack is not None:
        paths.lsm_list.write_text(stack)
    if apparmor:
        paths.apparmor_enabled.write_text("Y\n")
        paths.apparmor_profiles.write_text(profiles)
    if selinux is not None:
        paths.selinux_enforce.write_text(selinux)
    paths.aa_exec.touch()
    paths.runcon.touch()
    return paths


def test_detect_none(tmp_path: Path) -> None:
    state = detect_lsms(lsm_tree(tmp_path, stack=None, apparmor=False, selinux=None))
    assert not state.apparmor and not state.selinux
    assert state.summary() == "neither AppArmor nor SELinux"


def test_detect_apparmor_and_selinux(tmp_path: Path) -> None:
    state = detect_lsms(lsm_tree(tmp_path, stack="lockdown,capability,apparmor",
                                 apparmor=True, selinux=None))  # fmt: skip
    assert state.apparmor and not state.selinux
    assert "apparmor" in state.summary() and "LSM stack: lockdown" in state.summary()
    (tmp_path / "x").mkdir()
    state = detect_lsms(lsm_tree(tmp_path / "x", stack=None, apparmor=False, selinux="0"))
    assert state.selinux and state.selinux_enforcing is False


def test_module_loaded_but_not_in_stack_is_inactive(tmp_path: Path) -> None:
    state = detect_lsms(lsm_tree(tmp_path, stack="capability,selinux", apparmor=True,
                                 selinux="1"))  # fmt: skip
    assert not state.apparmor and state.selinux and state.selinux_enforcing


def test_requested_lsm_refused_where_inactive(tmp_path: Path) -> None:
    none = lsm_tree(tmp_path, stack="capability", apparmor=False, selinux=None)
    require_lsm(JailerConfig(jailer_id="vm1"), none)  # nothing asked: fine
    with pytest.raises(SandboxRequiredError, match="AppArmor is not active"):
        require_lsm(JailerConfig(jailer_id="vm1", apparmor_profile="ironclaw-vm1"), none)
    with pytest.raises(SandboxRequiredError, match="SELinux is not active"):
        require_lsm(
            JailerConfig(jailer_id="vm1", selinux_label="system_u:system_r:ironclaw_jailer_t:s0"),
            none,
        )


def test_apparmor_profile_must_be_loaded(tmp_path: Path) -> None:
    paths = lsm_tree(tmp_path, stack="apparmor", apparmor=True, selinux=None,
                     profiles="other (enforce)\n")  # fmt: skip
    cfg = JailerConfig(jailer_id="vm1", apparmor_profile="ironclaw-vm1")
    with pytest.raises(SandboxRequiredError, match="not loaded"):
        require_lsm(cfg, paths)
    paths.apparmor_profiles.write_text("other (enforce)\nironclaw-vm1 (enforce)\n")
    require_lsm(cfg, paths)
    paths.aa_exec.unlink()
    with pytest.raises(SandboxRequiredError, match="aa-exec"):
        require_lsm(cfg, paths)


def test_this_host_refuses_at_start_before_anything_is_made() -> None:
    # This machine's kernel has neither LSM active: asking for one fails clearly.
    state = detect_lsms()
    if state.apparmor:
        pytest.skip("AppArmor is active here")
    with pytest.raises(SandboxRequiredError, match="not active on this host"):
        require_lsm(JailerConfig(jailer_id="vm1", apparmor_profile="ironclaw-vm1"))
