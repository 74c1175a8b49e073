"""End to end as a new user: release archive -> `ironclaw install --from` -> `doctor` ->
`vm run`, with binaries found through PATH only.

The archive is built here, in Python, from whatever firecracker and jailer this machine has,
in Firecracker's release layout (``release-vX-<arch>/{firecracker,jailer}-vX-<arch>``).
``install`` lays out ``firecracker -> firecracker-vX``: the jailer names the jail after the
resolved file, and everything downstream must agree (this is what broke once).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "ironclaw_orchestrator.cli"]
TIMEOUT_S = 120


def _binaries() -> tuple[Path, Path, str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (the jailer and `ironclaw install` into a prefix)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is missing or not read/writable")
    from ironclaw_orchestrator.errors import IronclawError
    from ironclaw_orchestrator.vm.binaries import find_firecracker, find_jailer, read_version

    try:
        firecracker, jailer = find_firecracker(), find_jailer()
        version = read_version(firecracker, "firecracker")
    except IronclawError as exc:
        pytest.skip(f"no firecracker/jailer on this machine to pack: {exc}")
    release = "v{}.{}.{}".format(*version.release)
    return firecracker.resolve(), jailer.resolve(), release


def release_archive(firecracker: Path, jailer: Path, version: str, out: Path) -> Path:
    """What Firecracker publishes: firecracker-vX-<arch>.tgz (same as make-release-archive.sh)."""
    arch = platform.machine()
    member = f"release-{version}-{arch}"
    archive = out / f"firecracker-{version}-{arch}.tgz"

    def mode_0755(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o755, 0, 0, "root", "root"
        return info

    with tarfile.open(archive, "w:gz") as tar:
        dir_info = tarfile.TarInfo(member)
        dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(dir_info)
        for name, path in (("firecracker", firecracker), ("jailer", jailer)):
            tar.add(path, f"{member}/{name}-{version}-{arch}", filter=mode_0755)
    return archive


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def test_install_then_doctor_then_vm_run_through_path(tmp_path: Path) -> None:
    firecracker, jailer, version = _binaries()
    archive = release_archive(firecracker, jailer, version, tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    prefix = tmp_path / "prefix" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRONCLAW_")}
    env["PATH"] = f"{prefix}:/usr/bin:/bin"  # not /usr/local/bin: PATH -> the prefix only

    inst = run(
        ["install", "--version", version, "--from", str(archive), "--sha256", digest,
         "--prefix", str(prefix), "--chroot-base", "/var/jail"],
        env,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stdout + inst.stderr
    assert os.readlink(prefix / "firecracker") == f"firecracker-{version}"  # the user layout
    assert (prefix / "jailer").is_file()

    doctor = run(["doctor", "--json"], env)
    doc = json.loads(doctor.stdout)
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert doctor.returncode == 0, failed
    text = json.dumps(doc)
    assert str(prefix) in text  # the binaries it found are the installed ones
    live = next(c for c in doc["checks"] if c["name"] == "live boot (jailed)")
    assert live["status"] == "pass" and live["details"]["sandboxed"] is True
    assert not leftovers(live["details"]["vm_id"])

    vm_id = f"it-e2e-{uuid.uuid4().hex[:8]}"
    try:
        vm = run(["vm", "run", "--id", vm_id, "--require-sandbox"], env)
        assert vm.returncode == 0, vm.stdout + vm.stderr
    finally:
        left = leftovers(vm_id)
    assert not left, left
    assert not (Path("/var/jail") / "firecracker" / vm_id).exists()


@pytest.mark.parametrize(
    ("fc_is", "jailer_is", "fragment"),
    [
        ("firecracker", "firecracker", "jailer-{v}-{a} is not a jailer release binary"),
        ("jailer", "firecracker", "firecracker-{v}-{a} is not a firecracker release binary"),
    ],
    ids=["jailer-is-firecracker", "swapped"],
)
def test_install_refuses_real_binaries_under_the_wrong_name(
    tmp_path: Path, fc_is: str, jailer_is: str, fragment: str
) -> None:
    firecracker, jailer, version = _binaries()
    real = {"firecracker": firecracker, "jailer": jailer}
    archive = release_archive(real[fc_is], real[jailer_is], version, tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "jailer").write_bytes(b"the jailer installed before")
    (prefix / "firecracker").symlink_to("firecracker-v0.0.1")
    before = {p.name: (p.is_symlink(), p.readlink() if p.is_symlink() else p.read_bytes())
              for p in prefix.iterdir()}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRONCLAW_")}

    inst = run(
        ["install", "--version", version, "--from", str(archive), "--sha256", digest,
         "--prefix", str(prefix), "--chroot-base", str(tmp_path / "jail")],
        env,
    )  # fmt: skip

    assert inst.returncode == 5, inst.stdout + inst.stderr
    expected = fragment.format(v=version, a=platform.machine())
    assert expected in inst.stderr and "says it is" in inst.stderr, inst.stderr
    assert "installed" not in inst.stdout
    after = {p.name: (p.is_symlink(), p.readlink() if p.is_symlink() else p.read_bytes())
             for p in prefix.iterdir()}  # fmt: skip
    assert after == before
    assert not (tmp_path / "jail").exists()
