"""RateLimit: Firecracker's RateLimiter bodies (same from v1.0 to v1.14), parsing, config."""

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.api import drive_body
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.ratelimit import RateLimit, TokenBucket, VsockRateLimit

BW = TokenBucket(size=10 << 20, refill_time_ms=1000, one_time_burst=64 << 20)
OPS = TokenBucket(size=500, refill_time_ms=100)


def test_put_body_golden() -> None:
    # What v1.0.0 accepted and echoed back in GET /vm/config on this machine; v1.14's
    # swagger defines the same TokenBucket {size, one_time_burst, refill_time}.
    assert RateLimit(bandwidth=BW, ops=OPS).to_api() == {
        "bandwidth": {"size": 10485760, "refill_time": 1000, "one_time_burst": 67108864},
        "ops": {"size": 500, "refill_time": 100},
    }
    assert RateLimit(ops=OPS).to_api() == {"ops": {"size": 500, "refill_time": 100}}


def test_patch_body_disables_unset_buckets() -> None:
    # Firecracker keeps a bucket missing from a PATCH; size 0 / refill 0 disables it.
    assert RateLimit(ops=OPS).to_api_update() == {
        "bandwidth": {"size": 0, "refill_time": 0},
        "ops": {"size": 500, "refill_time": 100},
    }
    assert RateLimit().unlimited


def test_drive_body_golden_with_and_without_limit() -> None:
    plain = drive_body("rootfs", "/rootfs.ext4", root=True, read_only=False)
    assert plain == {
        "drive_id": "rootfs", "path_on_host": "/rootfs.ext4",
        "is_root_device": True, "is_read_only": False,
    }  # fmt: skip
    limited = drive_body(
        "rootfs", "/rootfs.ext4", root=True, read_only=True, rate_limit=RateLimit(bandwidth=BW)
    )
    assert limited["rate_limiter"] == {"bandwidth": BW.to_api()}
    # An empty RateLimit sends no limiter at all (v1.0 rejects an empty object nowhere, but
    # there is nothing to say).
    assert "rate_limiter" not in drive_body("d", "/d", root=False, read_only=True,
                                            rate_limit=RateLimit())  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10MiB/1s", TokenBucket(size=10 << 20, refill_time_ms=1000)),
        ("1000/100ms", TokenBucket(size=1000, refill_time_ms=100)),
        ("64K/250", TokenBucket(size=64 << 10, refill_time_ms=250)),
        ("1G/1s,burst=2G", TokenBucket(size=1 << 30, refill_time_ms=1000, one_time_burst=2 << 30)),
    ],
)
def test_parse(spec: str, expected: TokenBucket) -> None:
    assert TokenBucket.parse(spec) == expected
    assert TokenBucket.parse(spec).rate_per_s == expected.size * 1000 / expected.refill_time_ms


@pytest.mark.parametrize("spec", ["10MiB", "x/1s", "10M/soon", "10M/1s,bust=3", "0/1s", "5/0ms"])
def test_parse_rejects(spec: str) -> None:
    with pytest.raises((ValueError, ConfigError)):
        TokenBucket.parse(spec)


def test_bad_values_are_config_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="size"):
        TokenBucket(size=0, refill_time_ms=10)
    with pytest.raises(ConfigError, match=r"drive_rate_limit\.bandwidth\.refill_time_ms"):
        VmConfig(drive_rate_limit={"bandwidth": {"size": 1, "refill_time_ms": 0}})
    with pytest.raises(ConfigError, match="bogus"):
        VmConfig(net_rx_rate_limit={"bogus": 1})
    with pytest.raises(ConfigError, match="bytes_per_s"):
        VsockRateLimit(bytes_per_s=0)


def test_toml_shaped_config() -> None:
    cfg = VmConfig(
        drive_rate_limit={"bandwidth": {"size": 1 << 20, "refill_time_ms": 1000}},
        net_tx_rate_limit={"ops": {"size": 100, "refill_time_ms": 1000, "one_time_burst": 10}},
        vsock_rate_limit={"bytes_per_s": 1 << 20, "connections_per_s": 5},
    )
    assert cfg.drive_rate_limit is not None and cfg.drive_rate_limit.bandwidth is not None
    assert cfg.drive_rate_limit.bandwidth.rate_per_s == 1 << 20
    assert cfg.net_tx_rate_limit == RateLimit(ops=TokenBucket(size=100, refill_time_ms=1000,
                                                              one_time_burst=10))  # fmt: skip
    # Round-trips through the registry's JSON dump.
    assert VmConfig(**cfg.model_dump(mode="json")) == cfg
