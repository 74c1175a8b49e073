"""cgroup layout detection and version choice, against fake /proc trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import CgroupControllerUnavailableError, CgroupError
from ironclaw_orchestrator.vm.cgroups import (
    CgroupLayout,
    choose_version,
    detect_layout,
    parse_mountinfo,
    parse_proc_cgroup,
)

HYBRID_MOUNTINFO = """\
31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / {root}/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / {root}/devices rw,relatime - cgroup cgroup rw,devices
38 31 0:35 / {root}/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / {root}/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""

HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
5:devices:/
4:memory:/process_api/abc
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

V2_MOUNTINFO = """\
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 24 0:26 / {root} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""

V1_MOUNTINFO = """\
25 24 0:22 / {root}/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct,release_agent=/x
26 24 0:23 / {root}/memory rw,nosuid - cgroup cgroup rw,memory
27 24 0:24 / {root}/pids rw,nosuid - cgroup cgroup rw,clone_children,pids
28 24 0:25 / {root}/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
"""


def fake_proc(tmp_path: Path, mountinfo: str, cgroup: str, controllers: str | None) -> Path:
    root = tmp_path / "sys" / "fs" / "cgroup"
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mountinfo.format(root=root))
    (proc / "self" / "cgroup").write_text(cgroup)
    if controllers is not None:
        unified = root / "unified" if "unified" in mountinfo else root
        unified.mkdir(parents=True, exist_ok=True)
        (unified / "cgroup.controllers").write_text(controllers + "\n")
    return proc


def test_detect_hybrid(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, HYBRID_MOUNTINFO, HYBRID_CGROUP, "")
    layout = detect_layout(proc)
    root = tmp_path / "sys" / "fs" / "cgroup"
    assert layout.mode == "hybrid"
    assert layout.unified_mount == root / "unified"
    assert layout.unified_controllers == frozenset()
    assert layout.v1_mounts["memory"] == root / "memory"
    assert set(layout.v1_mounts) == {
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "blkio",
        "pids",
    }
    assert layout.own_paths["memory"] == "/process_api/abc"
    assert layout.own_paths["cpu"] == "/"
    assert layout.own_paths[""] == "/"
    assert "name=systemd" not in layout.own_paths


def test_detect_v2_only(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path, V2_MOUNTINFO, "0::/user.slice/app.service\n", "cpuset cpu io memory pids"
    )
    layout = detect_layout(proc)
    assert layout.mode == "v2"
    assert layout.v1_mounts == {}
    assert layout.unified_controllers == {"cpuset", "cpu", "io", "memory", "pids"}
    assert layout.own_paths == {"": "/user.slice/app.service"}


def test_detect_v1_only_comounted(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, V1_MOUNTINFO, "3:cpu,cpuacct:/a\n2:memory:/a/b\n", None)
    layout = detect_layout(proc)
    root = tmp_path / "sys" / "fs" / "cgroup"
    assert layout.mode == "v1"
    assert layout.unified_mount is None
    assert layout.v1_mounts == {
        "cpu": root / "cpu,cpuacct",
        "cpuacct": root / "cpu,cpuacct",
        "memory": root / "memory",
        "pids": root / "pids",
    }
    assert layout.own_paths == {"cpu": "/a", "cpuacct": "/a", "memory": "/a/b"}


def test_detect_nothing(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    layout = detect_layout(tmp_path)
    assert layout.mode == "none"
    with pytest.raises(CgroupError, match="no cgroup hierarchy"):
        choose_version(layout, None, ["memory"])


def test_mountinfo_escapes_and_roots() -> None:
    text = "40 31 0:37 /docker/x /sys/fs/my\\040cg rw - cgroup cgroup rw,memory\n"
    v1, unified, roots = parse_mountinfo(text)
    assert v1 == {"memory": Path("/sys/fs/my cg")}
    assert unified is None
    assert roots == {Path("/sys/fs/my cg"): "/docker/x"}


def test_visible_path_with_mount_root() -> None:
    mount = Path("/sys/fs/cgroup/memory")
    layout = CgroupLayout("v1", {"memory": mount}, None, frozenset(), {}, {mount: "/docker/x"})
    assert layout.visible_path(mount, "/docker/x/sub") == "sub"
    assert layout.visible_path(mount, "/docker/x") == ""
    assert layout.visible_path(mount, "/other") is None
    plain = CgroupLayout("v1", {"memory": mount}, None, frozenset(), {})
    assert plain.visible_path(mount, "/a/b") == "a/b"
    assert plain.visible_path(mount, "/") == ""


def test_parse_proc_cgroup_unified_only() -> None:
    assert parse_proc_cgroup("0::/init.scope\n") == {"": "/init.scope"}


def _layout(mode: str, v1: set[str], unified: set[str] | None) -> CgroupLayout:
    return CgroupLayout(
        mode,  # type: ignore[arg-type]
        {c: Path("/cg") / c for c in v1},
        None if unified is None else Path("/cg/unified"),
        frozenset(unified or ()),
        {},
    )


CTRLS = ["cpu", "memory", "pids"]


def test_choose_hybrid_empty_unified_picks_v1() -> None:
    layout = _layout("hybrid", {"cpu", "cpuacct", "memory", "pids"}, set())
    assert choose_version(layout, None, CTRLS) == 1


def test_choose_v2_when_unified_has_all() -> None:
    layout = _layout("v2", set(), {"cpu", "memory", "pids", "io"})
    assert choose_version(layout, None, [*CTRLS, "blkio", "cpuacct"]) == 2


def test_choose_explicit_v2_on_hybrid_explains() -> None:
    layout = _layout("hybrid", {"cpu", "memory", "pids"}, set())
    with pytest.raises(CgroupControllerUnavailableError) as info:
        choose_version(layout, 2, CTRLS)
    msg = str(info.value)
    assert "Controller cpu is unavailable" in msg
    assert "cgroup_version=1" in msg
    assert "systemd.unified_cgroup_hierarchy=1" in msg
    assert info.value.controller == "cpu"


def test_choose_explicit_v1_honoured_and_checked() -> None:
    both = _layout("hybrid", {"cpu", "memory", "pids"}, {"cpu", "memory", "pids"})
    assert choose_version(both, 1, CTRLS) == 1
    v2 = _layout("v2", set(), {"cpu", "memory", "pids"})
    with pytest.raises(CgroupControllerUnavailableError, match="cgroup_version=2"):
        choose_version(v2, 1, CTRLS)


def test_choose_v1_missing_controller() -> None:
    layout = _layout("v1", {"cpu", "memory"}, None)
    with pytest.raises(CgroupControllerUnavailableError, match="Controller pids") as info:
        choose_version(layout, None, CTRLS)
    assert info.value.controller == "pids"


def test_choose_v2_missing_controller_on_pure_v2() -> None:
    layout = _layout("v2", set(), {"cpu", "memory"})
    with pytest.raises(CgroupControllerUnavailableError, match="Controller pids is unavailable"):
        choose_version(layout, None, CTRLS)
