"""The reuse check of ``vm.netns.pool`` on crafted rtnetlink replies (no namespace needed)."""

from __future__ import annotations

import errno
import struct

import pytest

from ironclaw_orchestrator.errors import ConfigError, NetworkError
from ironclaw_orchestrator.vm.netns import pool

HDR = struct.Struct("=IHHII")
IFI = struct.Struct("=BxHiII")
LOOPBACK, UP = 0x8, 0x1


def link(index: int, flags: int, seq: int = 1, extra: bytes = b"") -> bytes:
    body = IFI.pack(0, 772, index, flags, 0) + extra
    return HDR.pack(HDR.size + len(body), 16, 2, seq, 0) + body


def done(seq: int = 1) -> bytes:
    return HDR.pack(HDR.size + 4, 3, 2, seq, 0) + b"\0\0\0\0"


class FakeProbe:
    """Answers the dump request with the given datagrams, one per recv."""

    def __init__(self, *replies: bytes) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []

    def setblocking(self, flag: bool) -> None:
        assert not flag, "the check never waits"

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.replies:
            raise BlockingIOError("no reply queued")
        return self.replies.pop(0)


def check(*replies: bytes) -> bool:
    return pool.holds_only_lo_down(FakeProbe(*replies))  # type: ignore[arg-type]


def test_lo_down_alone_is_as_the_kernel_made_it() -> None:
    probe = FakeProbe(link(1, LOOPBACK, extra=b"attrs..."), done())
    assert pool.holds_only_lo_down(probe)  # type: ignore[arg-type]
    length, kind, flags, _seq, _pid = HDR.unpack_from(probe.sent[0])
    assert (kind, flags, length) == (18, 0x301, HDR.size + IFI.size), "an RTM_GETLINK dump"


def test_the_reply_may_come_in_several_datagrams() -> None:
    assert check(link(1, LOOPBACK), done())
    assert check(link(1, LOOPBACK) + done())


@pytest.mark.parametrize(
    "replies",
    [
        (link(1, LOOPBACK | UP), done()),  # lo brought up
        (link(1, LOOPBACK), link(2, 0x1002), done()),  # a second link (a TAP, a veth end)
        (link(2, 0x1002), done()),  # no loopback at all
        (done(),),  # no link
        (HDR.pack(36, 2, 0, 1, 0) + b"\xff" * 20,),  # NLMSG_ERROR
        (link(1, LOOPBACK, seq=7), done()),  # an answer to something else
        (HDR.pack(4, 16, 0, 1, 0),),  # a length shorter than the header
        (link(1, LOOPBACK),),  # no end queued: never waited for
        (HDR.pack(20, 16, 2, 1, 0) + b"\0" * 4, done()),  # a link message too short
    ],
)
def test_anything_else_is_refused(replies: tuple[bytes, ...]) -> None:
    assert not check(*replies)


def test_the_pool_size_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pool.POOL_ENV, "0")
    assert pool.NetnsPool().size == 0
    monkeypatch.setenv(pool.POOL_ENV, "5")
    assert pool.NetnsPool().size == 5
    for bad in ("lots", "-1", "2.5", "²"):  # "²".isdigit(), but int("²") fails
        monkeypatch.setenv(pool.POOL_ENV, bad)
        with pytest.raises(ConfigError, match=f"IRONCLAW_NETNS_POOL={bad!r} is not a whole"):
            _ = pool.NetnsPool().size
    monkeypatch.delenv(pool.POOL_ENV)
    assert pool.NetnsPool().size == pool.DEFAULT_POOL_SIZE


def test_a_namespace_that_cannot_be_opened_is_a_network_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def old_kernel(fd: int, request: int, *args: object) -> int:
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")  # before Linux 4.9

    monkeypatch.setattr(pool.fcntl, "ioctl", old_kernel)
    with pool.new_probe() as probe, pytest.raises(NetworkError, match=r"SIOCGSKNS.*Linux 4\.9"):
        pool.open_netns(probe)
