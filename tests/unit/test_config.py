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


def test_json_round_trip_keeps_what_was_set() -> None:
    """What the supervisor receives (strict types still accept JSON strings for paths)."""
    v = VmConfig(
        vm_id="rt",
        kernel_path="/k",
        image_dirs=["/srv/images"],
        vsock_uds_path="/run/v.sock",
        jailer={"chroot_base_dir": "/srv/jail", "cgroup_version": 1, "cpu_limit": 1},
    )
    back = VmConfig.model_validate_json(v.model_dump_json(exclude_unset=True))
    assert back == v
    assert back.jailer is not None and back.jailer.model_fields_set == {
        "chroot_base_dir",
        "cgroup_version",
        "cpu_limit",
    }
    assert back.jailer_config().image_dirs == (Path("/srv/images"),)


def test_relative_host_paths_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    j = JailerConfig(chroot_base_dir="jail", exec_file=Path("bin/firecracker"))
    assert j.chroot_base_dir == tmp_path / "jail"
    assert j.exec_file == tmp_path / "bin" / "firecracker"
    v = VmConfig(kernel_path="vmlinux", rootfs_path="disks/root.ext4")
    assert (v.kernel_path, v.rootfs_path) == (
        str(tmp_path / "vmlinux"),
        str(tmp_path / "disks" / "root.ext4"),
    )


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"vcpu_count": True}, "vcpu_count"),
        ({"memory_mb": 1 << 21}, "memory_mb"),
        ({"boot_args": "a\x7fb"}, "boot_args"),
        ({"uplink_subnet": "169.254.0.0/30"}, "uplink_subnet"),
        ({"tap_host_cidr": "127.0.0.1/30"}, "tap_host_cidr"),
        ({"jailer": {"uid": True}}, "jailer.uid"),
        ({"jailer": {"cgroup_version": 2.0}}, "jailer.cgroup_version"),
        ({"jailer": {"chroot_base_dir": ""}}, "jailer.chroot_base_dir"),
        ({"jailer": {"netns": "/run/netns/a\x00b"}}, "jailer.netns"),
        ({"image_dirs": "/srv/images"}, "image_dirs"),
        ({"track_dirty_pages": 1}, "track_dirty_pages"),
        ({"track_dirty_pages": "yes"}, "track_dirty_pages"),
    ],
)
def test_hostile_values_name_their_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig(**kwargs)  # type: ignore[arg-type]
    assert f"  {key}" in str(info.value)


def test_assignment_is_validated_strictly_too() -> None:
    v = VmConfig()
    with pytest.raises(ConfigError, match="vcpu_count"):
        v.vcpu_count = True
