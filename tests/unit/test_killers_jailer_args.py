"""vm/jailer_args.py: the flags the golden tests leave out (log level, optional flags absent,
exact refusals), pinned where mutants survived."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.config import JailerConfig
from ironclaw_orchestrator.vm.jailer_args import (
    CgroupArg,
    build_jailer_argv,
    firecracker_args,
    lsm_exec_prefix,
)

J = Path("/opt/fc/jailer")
FC = Path("/opt/fc/firecracker-v1.14.1")


def test_firecracker_args_each_flag() -> None:
    sock = PurePosixPath("/run/api.sock")
    assert firecracker_args(sock) == ["--api-sock", "/run/api.sock"]
    debug = firecracker_args(sock, level="Debug")
    assert debug == ["--api-sock", "/run/api.sock", "--level", "Debug"]
    assert firecracker_args(sock, level="Info", seccomp_filter=PurePosixPath("/f.bpf")) == [
        "--api-sock", "/run/api.sock", "--level", "Info", "--seccomp-filter", "/f.bpf",
    ]  # fmt: skip
    none = firecracker_args(sock, no_seccomp=True)
    assert none == ["--api-sock", "/run/api.sock", "--no-seccomp"]


def test_firecracker_args_contradiction_message() -> None:
    with pytest.raises(ConfigError) as info:
        firecracker_args(PurePosixPath("/s"), seccomp_filter=PurePosixPath("/f"), no_seccomp=True)
    assert str(info.value) == "seccomp_filter and no_seccomp contradict each other: pick one"


def test_minimal_argv_has_no_optional_flags() -> None:
    """No netns, no PID namespace, no cgroups, no resource limits: none of their flags."""
    cfg = JailerConfig(jailer_id="m", new_pid_ns=False, no_file=None, chroot_base_dir="/srv/j")
    out = build_jailer_argv(
        cfg,
        jailer=J,
        exec_file=FC,
        version=Version(1, 14, 1),
        cgroup_version=2,
        cgroups=[],
        parent_cgroup="ironclaw",
        netns=None,
        level="Warning",
    )
    assert out == [
        str(J), "--id", "m", "--exec-file", str(FC), "--uid", "64000", "--gid", "64000",
        "--chroot-base-dir", "/srv/j",
        "--", "--api-sock", "/run/firecracker.socket", "--level", "Warning",
    ]  # fmt: skip


def test_cgroups_without_parent_and_with_both_limits() -> None:
    cfg = JailerConfig(jailer_id="m", no_file=4096, fsize=1024)
    out = build_jailer_argv(
        cfg,
        jailer=J,
        exec_file=FC,
        version=Version(1, 0, 0),
        cgroup_version=1,
        cgroups=[CgroupArg("pids.max", "64")],
        parent_cgroup=None,
        netns="/run/netns/x",
    )
    start = out.index("--netns")
    assert out[start : out.index("--", start + 1)] == [
        "--netns", "/run/netns/x", "--new-pid-ns",
        "--cgroup-version", "1", "--cgroup", "pids.max=64",
        "--resource-limit", "no-file=4096", "--resource-limit", "fsize=1024",
    ]  # fmt: skip


def test_too_old_message_and_boundary() -> None:
    cfg = JailerConfig(jailer_id="m")
    common: dict[str, object] = {
        "jailer": J, "exec_file": FC, "cgroup_version": 2, "cgroups": [],
        "parent_cgroup": None, "netns": None,
    }  # fmt: skip
    with pytest.raises(ConfigError) as info:
        build_jailer_argv(cfg, version=Version(0, 25, 9), **common)  # type: ignore[arg-type]
    assert str(info.value) == (
        "jailer v0.25.9 is older than v1.0.0, the oldest release supported: install a current "
        "release with `ironclaw install`"
    )
    assert build_jailer_argv(cfg, version=Version(1, 0, 0), **common)[0] == str(J)  # type: ignore[arg-type]


def test_lsm_prefix_each_case() -> None:
    assert lsm_exec_prefix(JailerConfig()) == []
    apparmor = lsm_exec_prefix(JailerConfig(apparmor_profile="p1"))
    assert apparmor == ["/usr/bin/aa-exec", "-p", "p1", "--"]
    label = "u:r:t:s0"
    assert lsm_exec_prefix(JailerConfig(selinux_label=label)) == ["/usr/bin/runcon", label]
    with pytest.raises(ConfigError) as info:
        lsm_exec_prefix(JailerConfig(apparmor_profile="p1", selinux_label=label))
    assert str(info.value) == "apparmor_profile and selinux_label cannot both be set: pick one LSM"


def test_cgroup_arg_render() -> None:
    assert CgroupArg("memory.max", "1024").render() == "memory.max=1024"
