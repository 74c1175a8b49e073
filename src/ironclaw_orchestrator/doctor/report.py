"""What ``ironclaw doctor`` reports: one :class:`Check` per question, in a :class:`DoctorReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ..vm.hostcheck import Finding

#: Every name doctor creates (cgroup and chroot probes, live VM ids) starts with this.
DOCTOR_ID_PREFIX = "ironclaw-doctor-"


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """The answer to one question about the host."""

    name: str
    status: Status
    #: What was found (a path, a version, a mode, a measurement).
    value: str
    #: One line saying how to fix it; empty when the check passed.
    fix: str = ""
    #: Machine-readable extras (e.g. live-boot timings in milliseconds).
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status.value,
            "value": self.value,
            "fix": self.fix,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class DoctorReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """``True`` when nothing failed: the host can run jailed VMs."""
        return not any(c.status is Status.FAIL for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.FAIL]

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(c.status is s for c in self.checks) for s in Status}

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready document holding every check."""
        return {
            "ok": self.ok,
            "summary": self.counts(),
            "checks": [c.to_dict() for c in self.checks],
        }


def check_from(name: str, finding: Finding) -> Check:
    """The :class:`Check` named ``name`` for a host check's finding (same status, value, fix)."""
    return Check(name, Status(finding.level), finding.value, finding.fix, dict(finding.details))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
