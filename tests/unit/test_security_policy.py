"""Generated AppArmor profiles and SELinux modules: content, and the real tools accept them.

``apparmor_parser -Q`` (parse and compile, no kernel load) and ``checkmodule`` /
``semodule_package`` run where installed (Debian: apparmor, checkpolicy, semodule-utils);
each check is also run on a deliberately broken policy, to prove it can fail.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.security.apparmor import generate_apparmor_profile, profile_name
from ironclaw_orchestrator.security.facts import JailFacts, jail_facts
from ironclaw_orchestrator.security.selinux import generate_selinux_module, module_name
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig

FC = Path("/opt/fc/firecracker-v1.14.1")


def facts(**kw: object) -> JailFacts:
    cfg = VmConfig(vm_id="web-1", rootfs_path="/img/rootfs.ext4", **kw)  # type: ignore[arg-type]
    return jail_facts(cfg, exec_file=FC)


def rules(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines()}


def test_apparmor_profile_is_the_jail_and_nothing_else() -> None:
    text = generate_apparmor_profile(facts())
    r = rules(text)
    assert profile_name(facts()) == "ironclaw-web-1"
    assert "profile ironclaw-web-1 flags=(attach_disconnected,mediate_deleted) {" in r
    jail = "/var/jail/firecracker-v1.14.1/web-1"
    assert f"{jail}/** rwlk," in r
    assert "/firecracker-v1.14.1 cx -> vmm," in r
    vmm = text[text.index("profile vmm") :]
    vr = rules(vmm)
    assert {"/dev/kvm rw,", "/vmlinux r,", "/rootfs.ext4 rwk,", f"{jail}/root/vmlinux r,"} <= vr
    assert "/run/firecracker.socket rw," in vr
    # Inherited stdout (the console terminal) is revalidated at exec: both may write it.
    assert sum(line.strip() == "/dev/pts/[0-9]* w," for line in text.splitlines()) == 2
    assert "/dev/net/tun rw," not in vr  # no networking configured
    assert {"network unix stream,", "deny network inet,", "deny network inet6,",
            "deny ptrace,", "deny mount,", "deny capability,"} <= vr  # fmt: skip
    assert not any(line.startswith(("network inet", "capability ")) for line in vr)


def test_apparmor_profile_follows_the_config() -> None:
    vmm = generate_apparmor_profile(
        facts(enable_networking=True, vsock_guest_cid=3, rootfs_read_only=True,
              jailer=JailerConfig(seccomp_filter=Path("/etc/f.bpf")))
    )  # fmt: skip
    vr = rules(vmm[vmm.index("profile vmm") :])
    assert {"/dev/net/tun rw,", "/rootfs.ext4 r,", "/run/vsock.sock rw,", "/run/vsock.sock_* rw,",
            "/seccomp-filter.bpf r,"} <= vr  # fmt: skip
    assert "/rootfs.ext4 rwk," not in vr


def test_selinux_module_content() -> None:
    te, fc = generate_selinux_module(facts(enable_networking=True))
    assert module_name(facts()) == "ironclaw_web_1"
    assert "module ironclaw_web_1 1.0;" in te
    assert "type_transition ironclaw_jailer_t ironclaw_vmm_exec_t:process ironclaw_vmm_t;" in te
    assert 'ironclaw_jail_t:file ironclaw_vmm_exec_t "firecracker-v1.14.1";' in te
    assert "allow ironclaw_vmm_t tun_tap_device_t:chr_file" in te
    assert "/var/jail(/.*)?\tsystem_u:object_r:ironclaw_jail_t:s0" in fc
    te_ro, _ = generate_selinux_module(facts(rootfs_read_only=True))
    assert (
        "allow ironclaw_vmm_t ironclaw_jail_t:file { open read getattr lock map ioctl };" in te_ro
    )
    assert "tun_tap_device_t:chr_file { open" not in te_ro


def apparmor_parse(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    parser = shutil.which("apparmor_parser")
    if parser is None:
        pytest.skip("apparmor_parser missing (Debian package apparmor)")
    path = tmp_path / "profile"
    path.write_text(text)
    return subprocess.run([parser, "-Q", "-K", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("networking", [False, True])
def test_apparmor_parser_accepts_the_profile(tmp_path: Path, networking: bool) -> None:
    text = generate_apparmor_profile(facts(enable_networking=networking, vsock_guest_cid=3))
    result = apparmor_parse(tmp_path, text)
    assert result.returncode == 0, result.stderr
    broken = apparmor_parse(tmp_path, text.replace("deny ptrace,", "deny ptrace"))
    assert broken.returncode != 0


def selinux_build(tmp_path: Path, name: str, te: str, fc: str) -> subprocess.CompletedProcess[str]:
    checkmodule, package = shutil.which("checkmodule"), shutil.which("semodule_package")
    if checkmodule is None or package is None:
        pytest.skip("checkmodule/semodule_package missing (packages checkpolicy, semodule-utils)")
    (tmp_path / f"{name}.te").write_text(te)
    (tmp_path / f"{name}.fc").write_text(fc)
    built = subprocess.run(
        [checkmodule, "-M", "-m", "-o", f"{name}.mod", f"{name}.te"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        return built
    return subprocess.run(
        [package, "-o", f"{name}.pp", "-m", f"{name}.mod", "-f", f"{name}.fc"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("networking", [False, True])
def test_selinux_module_compiles(tmp_path: Path, networking: bool) -> None:
    f = facts(enable_networking=networking, vsock_guest_cid=3)
    te, fc = generate_selinux_module(f)
    result = selinux_build(tmp_path, module_name(f), te, fc)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / f"{module_name(f)}.pp").stat().st_size > 0
    bad_dir = tmp_path / "broken"
    bad_dir.mkdir()
    broken = selinux_build(bad_dir, module_name(f), te.replace("allow ", "alow ", 1), fc)
    assert broken.returncode != 0


def test_cli_profile(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["security", "profile", "--apparmor", "--id", "web-1"])
    assert out.exit_code == 0, out.output
    assert "profile ironclaw-web-1 " in out.output
    out = runner.invoke(app, ["security", "profile", "--selinux", "--id", "web-1",
                              "--networking", "--output-dir", str(tmp_path)])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "tun_tap_device_t" in (tmp_path / "ironclaw_web_1.te").read_text()
    assert (tmp_path / "ironclaw_web_1.fc").read_text().startswith("/var/jail(/.*)?")
    both = runner.invoke(app, ["security", "profile", "--apparmor", "--selinux", "--id", "a"])
    assert both.exit_code == 2 and "one of" in both.output
    no_id = runner.invoke(app, ["security", "profile", "--apparmor"])
    assert no_id.exit_code == 2 and "--id" in no_id.output
