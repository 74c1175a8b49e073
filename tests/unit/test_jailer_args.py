"""Golden jailer command lines per Firecracker and cgroup version."""

from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.config import JailerConfig
from ironclaw_orchestrator.vm.jailer_args import CgroupArg, build_jailer_argv

J = Path("/usr/local/bin/jailer")
FC = Path("/usr/local/bin/firecracker-v1.14.1")


def argv(cfg: JailerConfig, version: str, cgv: int, cgroups: list[CgroupArg]) -> list[str]:
    return build_jailer_argv(
        cfg,
        jailer=J,
        exec_file=FC,
        version=Version.parse(version),
        cgroup_version=cgv,
        cgroups=cgroups,
        parent_cgroup="ironclaw",
        netns="/run/netns/ironclaw-vm1",
    )


V2 = [CgroupArg("cpu.max", "100000 100000"), CgroupArg("memory.max", str(320 << 20))]
V1 = [
    CgroupArg("cpu.cfs_period_us", "100000"),
    CgroupArg("cpu.cfs_quota_us", "100000"),
    CgroupArg("memory.limit_in_bytes", str(320 << 20)),
]


@pytest.mark.parametrize("version", ["v1.0.0", "v1.7.0", "v1.14.1"])
def test_v2_golden(version: str) -> None:
    cfg = JailerConfig(jailer_id="vm1")
    assert argv(cfg, version, 2, V2) == [
        str(J), "--id", "vm1", "--exec-file", str(FC), "--uid", "64000", "--gid", "64000",
        "--chroot-base-dir", "/var/jail", "--netns", "/run/netns/ironclaw-vm1", "--new-pid-ns",
        "--cgroup-version", "2", "--parent-cgroup", "ironclaw",
        "--cgroup", "cpu.max=100000 100000", "--cgroup", "memory.max=335544320",
        "--resource-limit", "no-file=2048",
        "--", "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip


def test_v1_golden_no_pidns_fsize() -> None:
    cfg = JailerConfig(jailer_id="vm1", new_pid_ns=False, fsize=1 << 30, uid=5000, gid=5001)
    out = argv(cfg, "v1.0.0", 1, V1)
    assert "--new-pid-ns" not in out
    assert out[out.index("--cgroup-version") + 1] == "1"
    assert [out[i + 1] for i, a in enumerate(out) if a == "--cgroup"] == [
        "cpu.cfs_period_us=100000", "cpu.cfs_quota_us=100000", "memory.limit_in_bytes=335544320",
    ]  # fmt: skip
    assert out[out.index("--uid") + 1] == "5000"
    assert out[out.index("--gid") + 1] == "5001"
    assert ["--resource-limit", f"fsize={1 << 30}"] == out[out.index("--") - 2 : out.index("--")]


def test_never_id_after_separator_nor_node_nor_daemonize() -> None:
    out = argv(JailerConfig(jailer_id="vm1"), "v1.14.1", 2, V2)
    tail = out[out.index("--") :]
    assert "--id" not in tail
    assert "--node" not in out and "--daemonize" not in out


def test_no_cgroup_flags_without_cgroups() -> None:
    out = argv(JailerConfig(jailer_id="vm1"), "v1.14.1", 2, [])
    assert "--cgroup" not in out and "--cgroup-version" not in out


def test_spec_syntax_never_emitted() -> None:
    out = " ".join(argv(JailerConfig(jailer_id="vm1"), "v1.14.1", 2, V2))
    assert "cpu:1" not in out and "memory:256" not in out


def test_too_old_jailer_refused() -> None:
    with pytest.raises(ConfigError, match="older than"):
        argv(JailerConfig(jailer_id="vm1"), "v0.25.0", 1, V1)


# --------------------------------------------------------------------------- seccomp and LSM


@pytest.mark.parametrize("version", ["v1.0.0", "v1.7.0", "v1.14.1"])
def test_custom_seccomp_filter_golden(version: str) -> None:
    cfg = JailerConfig(jailer_id="vm1", seccomp_filter=Path("/etc/ironclaw/fc.bpf"))
    out = argv(cfg, version, 2, V2)
    # The host path is staged into the jail; firecracker gets the jail-relative path.
    assert out[out.index("--") :] == [
        "--", "--api-sock", "/run/firecracker.socket", "--seccomp-filter", "/seccomp-filter.bpf",
    ]  # fmt: skip
    assert "/etc/ironclaw/fc.bpf" not in out


@pytest.mark.parametrize("version", ["v1.0.0", "v1.7.0", "v1.14.1"])
def test_no_seccomp_golden(version: str) -> None:
    out = argv(JailerConfig(jailer_id="vm1", no_seccomp=True), version, 2, V2)
    assert out[out.index("--") :] == ["--", "--api-sock", "/run/firecracker.socket", "--no-seccomp"]
    assert not any(a.startswith("--seccomp-level") for a in out)


def test_default_keeps_builtin_seccomp() -> None:
    out = argv(JailerConfig(jailer_id="vm1"), "v1.14.1", 2, V2)
    assert not {"--no-seccomp", "--seccomp-filter", "--seccomp-level"} & set(out)


def test_seccomp_filter_and_no_seccomp_contradict() -> None:
    cfg = JailerConfig(jailer_id="vm1", no_seccomp=True, seccomp_filter=Path("/f.bpf"))
    with pytest.raises(ConfigError, match="contradict"):
        argv(cfg, "v1.0.0", 2, V2)


@pytest.mark.parametrize("version", ["v1.0.0", "v1.7.0", "v1.14.1"])
def test_apparmor_exec_transition_golden(version: str) -> None:
    out = argv(JailerConfig(jailer_id="vm1", apparmor_profile="ironclaw-vm1"), version, 2, V2)
    assert out[:6] == ["/usr/bin/aa-exec", "-p", "ironclaw-vm1", "--", str(J), "--id"]


@pytest.mark.parametrize("version", ["v1.0.0", "v1.7.0", "v1.14.1"])
def test_selinux_exec_label_golden(version: str) -> None:
    label = "system_u:system_r:ironclaw_jailer_t:s0"
    out = argv(JailerConfig(jailer_id="vm1", selinux_label=label), version, 2, V2)
    assert out[:4] == ["/usr/bin/runcon", label, str(J), "--id"]


def test_both_lsms_refused() -> None:
    cfg = JailerConfig(
        jailer_id="vm1", apparmor_profile="p", selinux_label="system_u:system_r:t:s0"
    )
    with pytest.raises(ConfigError, match="pick one LSM"):
        argv(cfg, "v1.14.1", 2, V2)


def test_lsm_names_validated() -> None:
    with pytest.raises(ConfigError, match="apparmor_profile"):
        JailerConfig(apparmor_profile="x; rm -rf /")
    with pytest.raises(ConfigError, match="selinux_label"):
        JailerConfig(selinux_label="not a label")
