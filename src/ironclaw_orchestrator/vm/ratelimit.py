"""Rate limits: Firecracker's token buckets for drives and network, ours for vsock.

``RateLimit`` mirrors Firecracker's ``RateLimiter`` object (identical from v1.0 through v1.14):
two optional token buckets, ``bandwidth`` (bytes) and ``ops`` (requests or packets), each
``size`` tokens refilled completely every ``refill_time_ms``, plus an optional
``one_time_burst`` of extra tokens that is spent first and never refilled.

Firecracker has no vsock rate limiter, so :class:`VsockRateLimit` configures a token bucket
that :mod:`.vsock` applies to the host-side connections ironclaw opens or accepts.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*(\d+)\s*(ms|s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class _Strict(BaseModel):
    """Unknown keys are errors; bad values raise ``ConfigError`` naming the key."""

    # strict, as VmConfig: no bool for int, no "10" for 10 (README: validation is strict).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc, type(self).__name__) from None


def _config_error(exc: ValidationError, model: str) -> ConfigError:
    """``ConfigError`` naming each bad key (``bandwidth.size``), nested models included."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        nested = err.get("ctx", {}).get("error")
        if isinstance(nested, ConfigError):  # a nested model already listed its keys
            for line in str(nested).splitlines()[1:]:
                key, _, msg = line.strip().partition(": ")
                lines.append(f"  {loc}.{key}: {msg}" if loc else f"  {key}: {msg}")
            continue
        lines.append(f"  {loc or '(top level)'}: " + err["msg"].removeprefix("Value error, "))
    return ConfigError(f"invalid {model}:\n" + "\n".join(lines))


class TokenBucket(_Strict):
    """``size`` tokens refilled every ``refill_time_ms``; ``one_time_burst`` extra at first."""

    size: int = Field(ge=1, le=2**64 - 1)
    refill_time_ms: int = Field(ge=1, le=2**64 - 1)
    one_time_burst: int | None = Field(default=None, ge=0, le=2**64 - 1)

    @property
    def rate_per_s(self) -> float:
        """Sustained rate: tokens per second."""
        return self.size * 1000 / self.refill_time_ms

    def to_api(self) -> dict[str, int]:
        """Firecracker's ``TokenBucket`` body (``refill_time`` is in milliseconds)."""
        body = {"size": self.size, "refill_time": self.refill_time_ms}
        if self.one_time_burst is not None:
            body["one_time_burst"] = self.one_time_burst
        return body

    @classmethod
    def parse(cls, spec: str) -> TokenBucket:
        """``SIZE/TIME[,burst=N]``: ``10MiB/1s``, ``1000/100ms,burst=5000``.

        Sizes take binary suffixes (K, M, G, T with optional ``iB``); times ``ms`` (default)
        or ``s``. Raises ``ValueError`` saying what is wrong.
        """
        head, *opts = [p.strip() for p in spec.split(",")]
        size_s, sep, time_s = head.partition("/")
        if not sep:
            raise ValueError(f"rate limit {spec!r}: expected SIZE/TIME such as 10MiB/1s")
        burst: int | None = None
        for opt in opts:
            key, eq, value = opt.partition("=")
            if key.strip() != "burst" or not eq:
                raise ValueError(f"rate limit {spec!r}: unknown option {opt!r} (only burst=N)")
            burst = parse_size(value)
        return cls(size=parse_size(size_s), refill_time_ms=parse_ms(time_s), one_time_burst=burst)


#: What Firecracker understands as "no limit" for one bucket in a PATCH (size or refill 0).
DISABLED_BUCKET: dict[str, int] = {"size": 0, "refill_time": 0}


class RateLimit(_Strict):
    """Firecracker's ``RateLimiter``: a ``bandwidth`` (bytes) and an ``ops`` bucket."""

    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None

    @property
    def unlimited(self) -> bool:
        return self.bandwidth is None and self.ops is None

    def to_api(self) -> dict[str, Any]:
        """Body for a PUT (pre-boot): only the buckets that are set."""
        body: dict[str, Any] = {}
        if self.bandwidth is not None:
            body["bandwidth"] = self.bandwidth.to_api()
        if self.ops is not None:
            body["ops"] = self.ops.to_api()
        return body

    def to_api_update(self) -> dict[str, Any]:
        """Body for a PATCH: this limit replaces the old one, so unset buckets are disabled.

        (Firecracker leaves a bucket that is missing from a PATCH unchanged.)
        """
        return {
            "bandwidth": self.bandwidth.to_api() if self.bandwidth else dict(DISABLED_BUCKET),
            "ops": self.ops.to_api() if self.ops else dict(DISABLED_BUCKET),
        }


class VsockRateLimit(_Strict):
    """Per-VM limit on the host-side vsock traffic ironclaw carries (see :mod:`.vsock`).

    ``bytes_per_s`` counts payload in both directions together, over all of the VM's
    connections; ``connections_per_s`` counts connections opened to or accepted from the
    guest. ``*_burst`` is the bucket size (default: one second's worth).
    """

    bytes_per_s: int | None = Field(default=None, ge=1)
    bytes_burst: int | None = Field(default=None, ge=1)
    connections_per_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    connections_burst: int | None = Field(default=None, ge=1)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size such as 4096, 64K or 10MiB")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_ms(text: str) -> int:
    m = _TIME.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a time such as 100ms or 1s")
    return int(m.group(1)) * (1000 if (m.group(2) or "ms").lower() == "s" else 1)
