"""WarmPool claim rules that need no host: what a claim may override, and what not."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError, UsageError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import JailerConfig, VmConfig, WarmPool
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.snapshot import seal_snapshot


@pytest.fixture
def template() -> VmConfig:
    return VmConfig(kernel_path="/k", rootfs_path="/r", memory_mb=256, boot_args="console=ttyS0")


def pool(tmp_path: Path, template: VmConfig, **kw: object) -> WarmPool:
    return WarmPool(template, size=2, registry=Registry(tmp_path / "state"), **kw)  # type: ignore[arg-type]


def test_claim_overrides_guest_settings_and_limits(tmp_path: Path, template: VmConfig) -> None:
    p = pool(tmp_path, template)
    cfg = p._claimed_config(
        "job-1", {"memory_mb": 512, "jailer": JailerConfig(memory_limit_mb=600)}
    )
    assert cfg.vm_id == "job-1" and cfg.memory_mb == 512 and cfg.kernel_path == "/k"
    assert cfg.jailer_config().memory_limit_mb == 600
    assert cfg.jailer_config().jailer_id == "job-1"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"enable_networking": True}, "enable_networking"),
        ({"vsock_guest_cid": 5}, "vsock_guest_cid"),
        ({"jailer": JailerConfig(uid=5000)}, "jailer.uid"),
        ({"jailer": {"chroot_base_dir": "/elsewhere"}}, "jailer.chroot_base_dir"),
        ({"rootfs_path": None}, "root drive"),
    ],
)
def test_claim_refuses_what_is_fixed_at_spawn(
    tmp_path: Path, template: VmConfig, overrides: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        pool(tmp_path, template)._claimed_config("job-1", overrides)


def test_claim_refuses_bad_ids_and_keys(tmp_path: Path, template: VmConfig) -> None:
    p = pool(tmp_path, template)
    with pytest.raises(ConfigError, match="vm_id"):
        p._claimed_config("bad/id", {})
    with pytest.raises(ConfigError, match="no_such_key"):
        p._claimed_config("job-1", {"no_such_key": 1})


def test_snapshot_pool_fixes_guest_settings(tmp_path: Path, template: VmConfig) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "memory").write_bytes(b"m")
    (work / "vmstate").write_bytes(b"s")
    snap = seal_snapshot(
        work, tmp_path / "snap", config=template.model_copy(update={"rootfs_path": None}),
        version=Version.parse("v1.0.0"), diff=False, rootfs_jail=None,
    )  # fmt: skip
    p = pool(tmp_path, template, snapshot=snap)
    assert p.template.memory_mb == 256
    with pytest.raises(ConfigError, match="fixed by the pool's snapshot"):
        p._claimed_config("job-1", {"boot_args": "x"})
    cfg = p._claimed_config("job-1", {"jailer": JailerConfig(cpu_limit=0.5)})
    assert cfg.jailer_config().cpu_limit == 0.5


async def test_closed_pool_refuses_claims(tmp_path: Path, template: VmConfig) -> None:
    p = pool(tmp_path, template)
    await p.close()
    with pytest.raises(UsageError, match="closed"):
        await p.claim("job-1")
    with pytest.raises(UsageError, match="closed"):
        await p.start()


def test_negative_size(tmp_path: Path, template: VmConfig) -> None:
    with pytest.raises(ConfigError, match="size"):
        WarmPool(template, size=-1, registry=Registry(tmp_path / "s"))
