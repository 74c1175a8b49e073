"""VmConfig / JailerConfig: spec defaults, validation before anything runs."""

from pathlib import Path, PurePosixPath

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.config import (
    DEFAULT_MEMORY_HEADROOM_MIB,
    VMM_OVERHEAD_MIB,
    JailerConfig,
    VmConfig,
)


def test_spec_defaults() -> None:
    j = JailerConfig()
    assert j.jailer_binary == Path("/usr/local/bin/jailer")
    assert j.jailer_id == "ironclaw-vm"
    assert j.chroot_base_dir == Path("/var/jail")
    assert j.exec_file == Path("/usr/local/bin/firecracker-v1.14.1")
    assert (j.cpu_count, j.memory_limit_mb, j.netns) == (1, 256, None)
    assert j.uid != 0 and j.gid != 0
    v = VmConfig()
    assert (v.vm_id, v.vcpu_count, v.memory_mb) == ("default", 1, 512)
    assert v.kernel_path == "/path/to/vmlinux.bin"
    assert v.rootfs_path == "/path/to/rootfs.ext4"
    assert v.enable_networking is False


def test_spec_keyword_construction() -> None:
    j = JailerConfig(jailer_id="my-vm", cpu_count=2, memory_limit_mb=512, netns="/run/netns/x")
    assert j.netns == "/run/netns/x"


def test_socket_path_is_inside_root() -> None:
    j = JailerConfig(jailer_id="a", exec_file=Path("/usr/bin/firecracker-v1.14.1"))
    assert j.api_socket_path == Path("/var/jail/firecracker-v1.14.1/a/root/run/firecracker.socket")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vm_id": ""},
        {"vm_id": "a/b"},
        {"vm_id": "a" * 65},
        {"vm_id": "a_b"},
        {"vcpu_count": 0},
        {"vcpu_count": 33},
        {"memory_mb": 127},
        {"boot_args": "a\nb"},
        {"unknown_key": 1},
    ],
)
def test_vm_config_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig(**kwargs)  # type: ignore[arg-type]
    assert next(iter(kwargs)) in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"uid": 0},
        {"gid": 0},
        {"memory_limit_mb": 64},
        {"cgroup_version": 3},
        {"parent_cgroup": "../escape"},
        {"netns": "relative"},
        {"cpuset_cpus": "0-"},
        {"cpuset_cpus": "3-1"},
        {"api_sock": "run/x.sock"},
    ],
)
def test_jailer_config_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        JailerConfig(**kwargs)  # type: ignore[arg-type]


def test_assignment_is_validated() -> None:
    v = VmConfig()
    with pytest.raises(ConfigError):
        v.vm_id = "bad id"


def test_memory_limit_must_cover_guest_plus_overhead() -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig(memory_mb=512, jailer=JailerConfig(memory_limit_mb=512))
    assert str(512 + VMM_OVERHEAD_MIB) in str(info.value)


def test_jailer_config_derived_from_vm() -> None:
    v = VmConfig(vm_id="job-1", vcpu_count=2, memory_mb=256)
    j = v.jailer_config()
    assert j.jailer_id == "job-1"
    assert j.cpu_count == 2
    assert j.memory_limit_mb == 256 + DEFAULT_MEMORY_HEADROOM_MIB


def test_explicit_jailer_fields_win() -> None:
    v = VmConfig(vm_id="job-1", jailer=JailerConfig(jailer_id="other", cpu_count=1, uid=5000))
    j = v.jailer_config()
    assert (j.jailer_id, j.cpu_count, j.uid) == ("other", 1, 5000)


def test_require_sandbox_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRONCLAW_REQUIRE_SANDBOX", "1")
    assert VmConfig().sandbox_required()
    assert not VmConfig(require_sandbox=False).sandbox_required()
    monkeypatch.setenv("IRONCLAW_REQUIRE_SANDBOX", "0")
    assert not VmConfig().sandbox_required()


def test_api_sock_is_jail_relative() -> None:
    j = JailerConfig(api_sock=PurePosixPath("/run/api.sock"), jailer_id="x")
    assert j.api_socket_path.name == "api.sock"


def test_nested_jailer_errors_name_the_full_key() -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig(jailer={"uid": 0, "bogus": 1})  # type: ignore[arg-type]
    text = str(info.value)
    assert "jailer.uid:" in text and "jailer.bogus:" in text
