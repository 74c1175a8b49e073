"""Binary discovery order and version checks, with fake binaries."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import (
    BinaryNotFoundError,
    ConfigError,
    JailerNotFoundError,
    VersionMismatchError,
)
from ironclaw_orchestrator.vm import binaries as b


def fake(tmp: Path, name: str, version: str, banner: str | None = None) -> Path:
    path = tmp / name
    banner = banner or name.split("-")[0].capitalize()
    path.write_text(f"#!/bin/sh\necho '{banner} {version}'\n")
    path.chmod(0o755)
    return path


def test_version_parse_and_compare() -> None:
    v = b.Version.parse("Firecracker v1.0.0-44-gc73a27cb-dirty\n\nSupported ...")
    assert v.release == (1, 0, 0) and str(v) == "v1.0.0-44-gc73a27cb-dirty"
    assert b.Version.parse("Jailer v1.14.1") > v
    with pytest.raises(ValueError):
        b.Version.parse("nothing here")


#: Exactly what the binaries print for ``--version``: v1.0.0 built from git (this machine's),
#: and a release build of v1.14.1 / v1.16.1 (``println!("Firecracker v{}\n", ...)``).
V100_FC = (
    "Firecracker v1.0.0-44-gc73a27cb-dirty\n\n"
    "Supported snapshot data format versions: v0.23.0, v0.24.0, v0.25.0, v1.0.0\n\n"
)


@pytest.mark.parametrize(
    ("program", "output", "release"),
    [
        ("firecracker", V100_FC, (1, 0, 0)),
        ("jailer", "Jailer v1.0.0-44-gc73a27cb-dirty\n\n", (1, 0, 0)),
        ("firecracker", "Firecracker v1.14.1\n\n", (1, 14, 1)),
        ("jailer", "Jailer v1.16.1\n\n", (1, 16, 1)),
    ],
)
def test_parse_version_output_of_real_releases(
    program: str, output: str, release: tuple[int, int, int]
) -> None:
    assert b.parse_version_output(program, output).release == release


@pytest.mark.parametrize(
    ("program", "output", "said"),
    [
        ("jailer", V100_FC, "got 'Firecracker v1.0.0-44-gc73a27cb-dirty'"),
        ("firecracker", "Jailer v1.14.1\n", "got 'Jailer v1.14.1'"),
        ("firecracker", "firecracker v1.14.1\n", "got 'firecracker v1.14.1'"),
        ("firecracker", "Firecracker 1.14.1\n", "got 'Firecracker 1.14.1'"),
        ("firecracker", "warning: x\nFirecracker v1.14.1\n", "got 'warning: x'"),
        ("firecracker", "Firecracker v1.14.1 (evil)\n", "got 'Firecracker v1.14.1 (evil)'"),
        ("jailer", "", "got nothing"),
    ],
)
def test_parse_version_output_wants_the_programs_banner(
    program: str, output: str, said: str
) -> None:
    with pytest.raises(ValueError, match=r"expected '(Firecracker|Jailer) vX\.Y\.Z'") as excinfo:
        b.parse_version_output(program, output)
    assert said in str(excinfo.value)


def test_explicit_then_env_then_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = fake(tmp_path, "jailer-explicit", "v1.14.1")
    env = fake(tmp_path, "jailer-env", "v1.14.1")
    pathdir = tmp_path / "bin"
    pathdir.mkdir()
    on_path = fake(pathdir, "jailer", "v1.14.1")
    monkeypatch.setenv("PATH", str(pathdir))
    monkeypatch.setenv(b.JAILER_ENV, str(env))
    assert b.find_jailer(explicit) == explicit
    assert b.find_jailer() == env
    monkeypatch.delenv(b.JAILER_ENV)
    assert b.find_jailer() == on_path


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(b.JAILER_ENV, raising=False)
    monkeypatch.setattr(b, "DEFAULT_JAILER_BINARY", tmp_path / "nope")
    with pytest.raises(JailerNotFoundError) as info:
        b.find_jailer()
    assert "jailer binary not found" in str(info.value) and "ironclaw install" in str(info.value)
    with pytest.raises(JailerNotFoundError, match="from \\$IRONCLAW_JAILER"):
        monkeypatch.setenv(b.JAILER_ENV, str(tmp_path / "missing"))
        b.find_jailer()


def test_version_mismatch(tmp_path: Path) -> None:
    j = fake(tmp_path, "jailer", "v1.14.1")
    f = fake(tmp_path, "firecracker", "v1.13.0")
    with pytest.raises(VersionMismatchError) as info:
        b.check_pair(j, f)
    assert "v1.14.1" in str(info.value) and "v1.13.0" in str(info.value)


def test_matching_pair(tmp_path: Path) -> None:
    j = fake(tmp_path, "jailer", "v1.14.1")
    f = fake(tmp_path, "firecracker-v1.14.1", "v1.14.1")
    assert b.check_pair(j, f).version.release == (1, 14, 1)


def test_exec_name_rule_for_middle_versions(tmp_path: Path) -> None:
    j = fake(tmp_path, "jailer", "v1.5.0")
    f = fake(tmp_path, "vmm", "v1.5.0", banner="Firecracker")  # firecracker, renamed
    with pytest.raises(ConfigError, match=r"must|requires"):
        b.check_pair(j, f)
    b.check_exec_file_name(Path("vmm"), b.Version(1, 14, 1))  # allowed again in v1.13+


def test_exec_file_name_rule_applies_to_the_resolved_file(tmp_path: Path) -> None:
    """The jailer resolves symlinks before checking the name: so do we."""
    (tmp_path / "vmm-v1.5.0").write_text("")
    (tmp_path / "firecracker").symlink_to("vmm-v1.5.0")
    with pytest.raises(ConfigError, match=r"resolved name 'vmm-v1\.5\.0'"):
        b.check_exec_file_name(tmp_path / "firecracker", b.Version(1, 5, 0))
    (tmp_path / "firecracker-v1.5.0").write_text("")
    (tmp_path / "fc").symlink_to("firecracker-v1.5.0")
    b.check_exec_file_name(tmp_path / "fc", b.Version(1, 5, 0))


def test_not_a_firecracker(tmp_path: Path) -> None:
    path = tmp_path / "jailer"
    path.write_text("#!/bin/sh\necho hello\n")
    os.chmod(path, 0o755)
    with pytest.raises(BinaryNotFoundError, match="is not firecracker"):
        b.read_version(path, "firecracker")


def test_a_jailer_that_is_really_firecracker_is_refused_at_start_up(tmp_path: Path) -> None:
    # What `ironclaw install` refuses, the start path refuses too (a hand-copied binary).
    fc = _fake_binary(tmp_path / "firecracker", "v1.7.0")
    jailer = _fake_binary(tmp_path / "jailer", "v1.7.0")  # prints "Firecracker v1.7.0"
    with pytest.raises(BinaryNotFoundError) as info:
        b.check_pair(jailer, fc)
    assert str(jailer) in str(info.value)
    assert "is not jailer" in str(info.value)
    assert "'Firecracker v1.7.0'" in str(info.value)
    # The same file read as what it is passes, and the pair of real names passes.
    real_jailer = tmp_path / "jailer-ok"
    real_jailer.write_text("#!/bin/sh\necho 'Jailer v1.7.0'\n")
    real_jailer.chmod(0o755)
    assert b.check_pair(real_jailer, fc).version == b.Version(1, 7, 0)


# --------------------------------------------------------------------------- version cache


def _fake_binary(path: Path, version: str) -> Path:
    path.write_text(f"#!/bin/sh\necho 'Firecracker {version}'\n")
    path.chmod(0o755)
    return path


def test_versions_are_cached_across_processes_in_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(run_dir))
    fc = _fake_binary(tmp_path / "firecracker", "v1.7.0")
    runs: list[str] = []
    real_run = subprocess.run

    def counting(argv: list[str], *args: object, **kwargs: object) -> object:
        runs.append(argv[0])
        return real_run(argv, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(b.subprocess, "run", counting)
    monkeypatch.setattr(b, "_version_cache", {})
    assert b.read_version(fc, "firecracker") == b.Version(1, 7, 0)
    assert len(runs) == 1
    cache = run_dir / b.VERSION_CACHE_FILE
    assert cache.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr(b, "_version_cache", {})  # a new process
    assert b.read_version(fc, "firecracker") == b.Version(1, 7, 0)
    assert len(runs) == 1  # from the file
    # The binary replaced by another release: its identity changed, so it runs again.
    replacement = _fake_binary(tmp_path / "new", "v1.8.0")
    replacement.replace(fc)
    monkeypatch.setattr(b, "_version_cache", {})
    assert b.read_version(fc, "firecracker") == b.Version(1, 8, 0)
    assert len(runs) == 2


@pytest.mark.parametrize("spoil", ["group-writable", "garbage", "other-file"])
def test_a_version_cache_others_could_write_or_that_is_damaged_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spoil: str
) -> None:

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(run_dir))
    fc = _fake_binary(tmp_path / "firecracker", "v1.7.0")
    st = fc.stat()
    ident = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    forged = {str(fc.resolve()): {"file": ident, "version": "v9.9.9"}}
    cache = run_dir / b.VERSION_CACHE_FILE
    cache.write_text("{not json" if spoil == "garbage" else json.dumps(forged))
    cache.chmod(0o620 if spoil == "group-writable" else 0o600)
    if spoil == "other-file":
        forged[str(fc.resolve())]["file"] = [0, 0, 0, 0, 0]
        cache.write_text(json.dumps(forged))
    monkeypatch.setattr(b, "_version_cache", {})
    # ran the binary, not the forged entry:
    assert b.read_version(fc, "firecracker") == b.Version(1, 7, 0)


def test_the_version_cache_forgets_binaries_that_are_gone_and_stays_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(run_dir))
    gone = _fake_binary(tmp_path / "gone", "v1.0.0")
    b.read_version(gone, "firecracker")
    gone.unlink()
    for i in range(40):
        b.read_version(_fake_binary(tmp_path / f"fc{i}", "v1.0.0"), "firecracker")
    data = json.loads((run_dir / b.VERSION_CACHE_FILE).read_text())
    assert str(gone) not in data
    assert len(data) == 32 and str((tmp_path / "fc39").resolve()) in data
