"""Staging with the real jailer: a kernel others can write is copied, never linked, and
``image_dirs`` refuses a symlink out of the image directory before anything is made."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from jailcheck import assert_jailed

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import VmConfig, start_firecracker
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

pytestmark = pytest.mark.integration


def _config(vm_id: str, kernel: Path, chroot_base: Path, **kw: object) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(kernel),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        jailer={"chroot_base_dir": str(chroot_base)},
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("mode", "linked"), [(0o644, True), (0o666, False)])
async def test_kernel_is_linked_only_when_only_root_can_change_it(
    vm_id: str, chroot_base: Path, tmp_path: Path, mode: int, linked: bool
) -> None:
    assert os.stat(tmp_path).st_dev == os.stat(chroot_base).st_dev, "needs one filesystem"
    kernel = tmp_path / "vmlinux"
    shutil.copyfile(probe_kernel_path(ProbeBehaviour.RESET), kernel)
    kernel.chmod(mode)
    vm = await start_firecracker(
        _config(vm_id, kernel, chroot_base), registry=Registry(tmp_path / "state")
    )
    try:
        assert_jailed(vm, chroot_base)
        staged = vm.vmm.jail_dir / "root" / "vmlinux"  # type: ignore[union-attr]
        same_inode = os.stat(staged).st_ino == os.stat(kernel).st_ino
        assert same_inode is linked
        if not linked:
            st = os.stat(staged)
            assert (st.st_uid, st.st_mode & 0o777) == (vm.vmm.config.uid, 0o400)  # type: ignore[union-attr]
        await vm.start_instance()
        assert await vm.wait() == 0
    finally:
        await vm.stop()
    assert os.stat(kernel).st_mode & 0o777 == mode and os.stat(kernel).st_uid == 0


async def test_image_dirs_refuse_a_symlink_out(
    vm_id: str, chroot_base: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "elsewhere" / "vmlinux"
    outside.parent.mkdir()
    shutil.copyfile(probe_kernel_path(ProbeBehaviour.RESET), outside)
    (images / "vmlinux").symlink_to(outside)
    config = _config(vm_id, images / "vmlinux", chroot_base, image_dirs=[str(images)])
    with pytest.raises(ConfigError, match=r"kernel_path .* outside the image directories"):
        await start_firecracker(config, registry=Registry(tmp_path / "state"))
    assert not list((tmp_path / "state").glob("*.json"))
