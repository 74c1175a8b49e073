"""What a gc run did, would do (dry run), or left alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GcAction", "GcReport"]


@dataclass
class GcAction:
    """One thing gc did, would do (dry run), or left alone."""

    kind: str  # vmm, owner, cgroups, cgroup, netns, jail_dir, run_dir, socket, record, file
    name: str
    vm_id: str | None
    #: killed, reaped, removed, moved aside, would kill, would remove, ..., skipped, failed
    action: str
    reason: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcReport:
    dry_run: bool
    actions: list[GcAction] = field(default_factory=list)
    #: Ids whose owner is alive: left alone.
    live: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(a.error for a in self.actions)

    @property
    def errors(self) -> list[GcAction]:
        return [a for a in self.actions if a.error]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "live": list(self.live),
            "actions": [a.to_dict() for a in self.actions],
        }
