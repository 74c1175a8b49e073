"""Deciding a VM's cgroups without touching them: controllers, mounts, the parent, attach keys.

Layout: ``<mount of each controller>/<parent>/<vm_id>``; ``<parent>`` is what the jailer gets
as ``--parent-cgroup``. It defaults to ``<deepest own cgroup>/ironclaw`` (the orchestrator's
own cgroup among the controllers used, when they nest), so nothing is created outside the
orchestrator's own subtree unless ``parent_cgroup`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...errors import CgroupError, ConfigError
from ...names import PARENT_CGROUP_NAME as DEFAULT_PARENT_CGROUP_NAME
from ...names import is_valid_id
from .layout import (
    CgroupLayout,
    controller_names,
    is_ancestor_or_equal,
    missing_controllers,
    unavailable_error,
)
from .limits import CgroupSetting, via_jailer

Version = Literal[1, 2]
UNIFIED = "unified"


def depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def norm_parent(value: str) -> str:
    parts = [p for p in value.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ConfigError(f"parent_cgroup {value!r} must be a relative path like 'ironclaw'")
    return "/".join(parts)


def chain(mount: Path, parent: str, vm_id: str) -> list[str]:
    """Directories from ``mount`` (exclusive) down to the VM's (inclusive), as strings
    (``Path / part`` re-parses the whole path at each level)."""
    base = str(mount).rstrip("/")
    out: list[str] = []
    for part in [*parent.split("/"), vm_id]:
        base = f"{base}/{part}"
        out.append(base)
    return out


@dataclass(frozen=True)
class Plan:
    """What :meth:`VmCgroups.plan` decided (the fields of a fresh :class:`VmCgroups`)."""

    parent: str
    explicit_parent: bool
    mounts: dict[str, Path]
    own: dict[str, str]
    controllers: tuple[str, ...]
    attach_keys: tuple[str, ...]


#: Plans by (layout, version, controllers used, controllers via the jailer, parent): the same
#: for every VM of one configuration. Keyed on the layout *object*, which
#: :func:`~.layout.detect_layout` replaces whenever the host's layout changes; each entry
#: holds its layout, so the id cannot be reused while it is cached.
_plans: dict[tuple[object, ...], tuple[CgroupLayout, Plan]] = {}
_MAX_PLANS = 16


def plan(
    layout: CgroupLayout,
    version: Version,
    vm_id: str,
    settings: Sequence[CgroupSetting],
    parent_cgroup: str | None,
) -> Plan:
    """Decide directories and parent; touches nothing. Only the id differs between VMs of
    one configuration: the rest is decided once (and kept while the layout stays)."""
    if not is_valid_id(vm_id):
        raise ConfigError(
            f"vm_id {vm_id!r} is invalid for a cgroup name: use 1 to 64 characters from "
            "A-Z, a-z, 0-9 and '-'"
        )
    used = frozenset(s.controller for s in settings)
    via = frozenset(s.controller for s in via_jailer(settings))
    key = (id(layout), version, used, via, parent_cgroup)
    hit = _plans.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1]
    decided = _decide(layout, version, set(used), via, parent_cgroup)
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = (layout, decided)
    return decided


def _decide(
    layout: CgroupLayout,
    version: Version,
    used: set[str],
    via: frozenset[str],
    parent_cgroup: str | None,
) -> Plan:
    if version == 1 and "cpu" in used:
        used.add("cpuacct")  # per-VM CPU usage: cpuacct is its own hierarchy on many hosts
    controllers = tuple(controller_names(used, version))
    missing = missing_controllers(layout, version, controllers)
    if missing:
        raise unavailable_error(layout, version, missing)

    mounts: dict[str, Path] = {}
    own: dict[str, str] = {}
    keys = (UNIFIED,) if version == 2 else controllers
    for key in keys:
        mount = layout.mount_for(key, version)
        assert mount is not None  # checked by missing_controllers
        own_path = layout.own_path(key, version)
        visible = layout.visible_path(mount, own_path)
        if visible is None and parent_cgroup is None:
            raise CgroupError(
                f"the orchestrator's own {key} cgroup {own_path} is not visible under the "
                f"mount {mount} (it shows {layout.mount_roots.get(mount, '/')}): cannot "
                "place VM cgroups beneath it; set JailerConfig.parent_cgroup to a path "
                f"relative to {mount}",
                controller=key,
                path=str(mount),
            )
        mounts[key] = mount
        own[key] = visible or ""

    parent = norm_parent(parent_cgroup) if parent_cgroup is not None else derive_parent(own)

    attach: list[str] = []
    if version == 2:
        if not via:
            attach.append(UNIFIED)
    else:
        jailer_dirs = {mounts[c] for c in via}
        attach = [c for c in controllers if mounts[c] not in jailer_dirs]
    return Plan(
        parent=parent,
        explicit_parent=parent_cgroup is not None,
        mounts=mounts,
        own=own,
        controllers=controllers,
        attach_keys=tuple(attach),
    )


def derive_parent(own: dict[str, str]) -> str:
    deepest = max(own.values(), key=depth)
    diverging = {k: v for k, v in own.items() if not is_ancestor_or_equal(v, deepest)}
    if diverging:
        listing = ", ".join(f"{k}: /{v}" for k, v in sorted(own.items()))
        raise CgroupError(
            "cannot derive one --parent-cgroup for all controllers: the orchestrator's own "
            f"cgroups do not nest ({listing}), and the jailer takes a single parent path "
            "for every hierarchy. Set JailerConfig.parent_cgroup explicitly (relative to "
            f"each mount, e.g. {DEFAULT_PARENT_CGROUP_NAME!r}) to a place you may use in "
            "every hierarchy",
            controller=next(iter(sorted(diverging))),
            path=f"/{deepest}",
        )
    return join(deepest, DEFAULT_PARENT_CGROUP_NAME)


__all__ = ["UNIFIED", "Plan", "Version", "chain", "derive_parent", "norm_parent", "plan"]
