"""Usage counters of one VM's cgroups. A field the layout cannot provide is ``None``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .fs import CgroupFs, read_optional


@dataclass(frozen=True)
class IoStat:
    read_bytes: int = 0
    write_bytes: int = 0
    read_ios: int = 0
    write_ios: int = 0


@dataclass(frozen=True)
class CgroupStats:
    """Counters for one VM; ``None`` means "not available here", never zero."""

    cpu_usage_ns: int | None = None
    nr_periods: int | None = None
    nr_throttled: int | None = None
    throttled_ns: int | None = None
    memory_current_bytes: int | None = None
    memory_peak_bytes: int | None = None
    oom_kills: int | None = None
    io: dict[str, IoStat] | None = field(default=None)
    pids_current: int | None = None


def parse_flat_keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, memory.oom_control) -> dict."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else None


def parse_io_stat_v2(text: str | None) -> dict[str, IoStat] | None:
    """v2 ``io.stat``: ``MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N``."""
    if text is None:
        return None
    out: dict[str, IoStat] = {}
    for line in text.splitlines():
        dev, _, rest = line.partition(" ")
        if ":" not in dev:
            continue
        kv = dict(p.split("=", 1) for p in rest.split() if "=" in p)
        out[dev] = IoStat(
            read_bytes=int(kv.get("rbytes", 0)),
            write_bytes=int(kv.get("wbytes", 0)),
            read_ios=int(kv.get("rios", 0)),
            write_ios=int(kv.get("wios", 0)),
        )
    return out


def parse_blkio_v1(bytes_text: str | None, ios_text: str | None) -> dict[str, IoStat] | None:
    """v1 ``blkio.throttle.io_service_bytes`` + ``io_serviced``: ``MAJ:MIN Read N`` lines."""
    if bytes_text is None and ios_text is None:
        return None
    acc: dict[str, dict[str, int]] = {}
    for text, kind in ((bytes_text, "bytes"), (ios_text, "ios")):
        for line in (text or "").splitlines():
            parts = line.split()
            if len(parts) != 3 or ":" not in parts[0] or parts[1] not in ("Read", "Write"):
                continue
            key = f"{parts[1].lower()}_{kind}"
            acc.setdefault(parts[0], {})[key] = int(parts[2])
    return {dev: IoStat(**vals) for dev, vals in acc.items()}


def _us_to_ns(value: int | None) -> int | None:
    return None if value is None else value * 1000


def read_stats_v2(fs: CgroupFs, cg: Path) -> CgroupStats:
    cpu = parse_flat_keyed(read_optional(fs, cg / "cpu.stat"))
    events = read_optional(fs, cg / "memory.events")
    return CgroupStats(
        cpu_usage_ns=_us_to_ns(cpu.get("usage_usec")),
        nr_periods=cpu.get("nr_periods"),
        nr_throttled=cpu.get("nr_throttled"),
        throttled_ns=_us_to_ns(cpu.get("throttled_usec")),
        memory_current_bytes=_int(read_optional(fs, cg / "memory.current")),
        memory_peak_bytes=_int(read_optional(fs, cg / "memory.peak")),
        oom_kills=None if events is None else parse_flat_keyed(events).get("oom_kill"),
        io=parse_io_stat_v2(read_optional(fs, cg / "io.stat")),
        pids_current=_int(read_optional(fs, cg / "pids.current")),
    )


def read_stats_v1(fs: CgroupFs, paths: dict[str, Path]) -> CgroupStats:
    def opt(controller: str, file: str) -> str | None:
        cg = paths.get(controller)
        return None if cg is None else read_optional(fs, cg / file)

    cpu_text = opt("cpu", "cpu.stat")
    cpu = parse_flat_keyed(cpu_text)
    oom = opt("memory", "memory.oom_control")
    return CgroupStats(
        cpu_usage_ns=_int(opt("cpuacct", "cpuacct.usage")),
        nr_periods=cpu.get("nr_periods"),
        nr_throttled=cpu.get("nr_throttled"),
        throttled_ns=cpu.get("throttled_time"),
        memory_current_bytes=_int(opt("memory", "memory.usage_in_bytes")),
        memory_peak_bytes=_int(opt("memory", "memory.max_usage_in_bytes")),
        oom_kills=None if oom is None else parse_flat_keyed(oom).get("oom_kill"),
        io=parse_blkio_v1(
            opt("blkio", "blkio.throttle.io_service_bytes"),
            opt("blkio", "blkio.throttle.io_serviced"),
        ),
        pids_current=_int(opt("pids", "pids.current")),
    )


def read_stats(fs: CgroupFs, version: Literal[1, 2], paths: dict[str, Path]) -> CgroupStats:
    if version == 2:
        return read_stats_v2(fs, paths["unified"])
    return read_stats_v1(fs, paths)
