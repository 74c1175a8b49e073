"""The Unix socket path budget (vm/hostcheck.py, vm/inputs.py): 107 bytes.

Linux's ``sun_path`` holds 108 bytes and Firecracker (Rust's ``UnixListener::bind``) needs
room for the terminating NUL, so a socket path may have at most 107 bytes; a longer one makes
firecracker start while nobody can connect. Bytes, not characters, count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from property_strategies import ID_ALPHABET, ID_MAX_LENGTH

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import inputs
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig
from ironclaw_orchestrator.vm.hostcheck import (
    check_socket_budget,
    inspect_socket_budget,
    socket_path_bytes,
)

LIMIT = 107
#: A short exec name, so that even a 64-character id can fit (with firecracker-v1.0.0 and
#: /var/jail, ids of up to 50 characters fit: test_default_layout_fits_50_character_ids).
EXEC = "fc"
#: ``<base>/<exec>/<id>/root/run/firecracker.socket`` minus base and id.
FIXED = len(f"/{EXEC}//root/run/firecracker.socket")

path_chars = st.sampled_from(["a", "-", "é", "ж", "€", "\U0001d11e"])  # 1 to 4 bytes each


@given(st.lists(path_chars, min_size=80, max_size=115).map(lambda cs: "/" + "".join(cs)))
@example("/" + "a" * 106)  # 107 bytes: the longest that fits
@example("/" + "a" * 104 + "é")  # 107 bytes, 106 characters
@example("/" + "a" * 105 + "é")  # 108 bytes
def test_budget_counts_bytes_and_allows_exactly_107(text: str) -> None:
    path = Path(text)
    size = len(text.encode())
    assert socket_path_bytes(path) == size
    if size <= LIMIT:
        check_socket_budget(path)
    else:
        with pytest.raises(ConfigError, match=f"{size} bytes, over the 107-byte limit"):
            check_socket_budget(path)


@pytest.mark.parametrize(("size", "ok"), [(106, True), (107, True), (108, False), (109, False)])
def test_socket_path_boundary(size: int, ok: bool) -> None:
    path = Path("/" + "s" * (size - 1))
    assert socket_path_bytes(path) == size
    if ok:
        check_socket_budget(path)
    else:
        with pytest.raises(ConfigError, match=f"by {size - LIMIT} bytes"):
            check_socket_budget(path)


def test_multibyte_path_boundary() -> None:
    check_socket_budget(Path("/" + "é" * 53))  # 107 bytes, 54 characters
    with pytest.raises(ConfigError, match="108 bytes"):
        check_socket_budget(Path("/a" + "é" * 53))


def _base_for(total: int, id_len: int) -> str:
    """A chroot base making the API socket path of an ``id_len`` id ``total`` bytes long."""
    pad = total - FIXED - id_len - 1
    assert pad >= 1
    return "/" + "b" * pad


@given(st.integers(2, 60).map(lambda n: "/" + "b" * n))
def test_doctor_reports_the_exact_longest_id(base: str) -> None:
    """``inspect_socket_budget``'s ``max_id_length`` is exact: that id fits, one more does not."""
    cfg = JailerConfig(chroot_base_dir=base)
    finding = inspect_socket_budget(cfg, EXEC)

    def fits(n: int) -> bool:
        jail = cfg.model_copy(update={"jailer_id": "x" * n, "exec_file": Path("/opt") / EXEC})
        return socket_path_bytes(jail.api_socket_path) <= LIMIT

    if finding.level == "pass":
        assert fits(ID_MAX_LENGTH)
    elif finding.level == "warn":
        longest = finding.details["max_id_length"]
        assert isinstance(longest, int) and 1 <= longest < ID_MAX_LENGTH
        assert fits(longest) and not fits(longest + 1)
    else:
        assert not fits(1)


@pytest.mark.parametrize(("total", "level"), [(LIMIT, "pass"), (LIMIT + 1, "warn")])
def test_doctor_boundary_for_the_longest_id(total: int, level: str) -> None:
    cfg = JailerConfig(chroot_base_dir=_base_for(total, ID_MAX_LENGTH))
    finding = inspect_socket_budget(cfg, EXEC)
    assert finding.level == level
    assert finding.details["bytes"] == total
    if level == "warn":
        assert finding.details["max_id_length"] == ID_MAX_LENGTH - 1


# --------------------------------------------------------------------------- preflight


@pytest.fixture
def fake_firecracker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preflight resolves the firecracker binary; here it is a fixed, unresolvable path."""
    monkeypatch.setattr(inputs, "find_firecracker", lambda explicit=None: Path("/opt") / EXEC)


def _preflight(vm_id: str, base: str, vsock: bool = False, uds: str = "/v.sock") -> None:
    cfg = VmConfig(
        vm_id=vm_id,
        jailer=JailerConfig(chroot_base_dir=base),
        vsock_guest_cid=3 if vsock else None,
        vsock_uds_path=uds,
    )
    inputs._check_socket_paths(cfg, cfg.jailer_config())


@given(
    st.text(ID_ALPHABET, min_size=1, max_size=ID_MAX_LENGTH),
    st.integers(1, 40).map(lambda n: "/" + "b" * n),
    st.booleans(),
    st.integers(1, 30).map(lambda n: "/" + "u" * n),
)
def test_preflight_refuses_exactly_the_paths_that_do_not_fit(
    vm_id: str, base: str, vsock: bool, uds: str
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "find_firecracker", lambda explicit=None: Path("/opt") / EXEC)
        _check_preflight(vm_id, base, vsock, uds)


def _check_preflight(vm_id: str, base: str, vsock: bool, uds: str) -> None:
    chroot = f"{base}/{EXEC}/{vm_id}/root"
    api = f"{chroot}/run/firecracker.socket"
    # Firecracker listens on <uds>_<port> for guest-initiated connections, any u32 port.
    longest_vsock = f"{chroot}{uds}_{2**32 - 1}"
    fits = len(api) <= LIMIT and (not vsock or len(longest_vsock) <= LIMIT)
    if fits:
        _preflight(vm_id, base, vsock, uds)
    else:
        with pytest.raises(ConfigError, match="over the 107-byte limit") as err:
            _preflight(vm_id, base, vsock, uds)
        assert vm_id in str(err.value)


@pytest.mark.parametrize(("total", "ok"), [(LIMIT, True), (LIMIT + 1, False)])
def test_preflight_boundary_with_a_64_character_id(
    fake_firecracker: None, total: int, ok: bool
) -> None:
    vm_id = "i" * ID_MAX_LENGTH
    base = _base_for(total, ID_MAX_LENGTH)
    assert len(f"{base}/{EXEC}/{vm_id}/root/run/firecracker.socket") == total
    if ok:
        _preflight(vm_id, base)
    else:
        with pytest.raises(ConfigError, match="108 bytes"):
            _preflight(vm_id, base)
        _preflight(vm_id[:-1], base)  # one character shorter fits


def test_default_layout_fits_50_character_ids(fake_firecracker: None) -> None:
    """What the facts note says of ``/var/jail/firecracker-v1.0.0/<id>/root/run/...``."""
    cfg = JailerConfig(chroot_base_dir="/var/jail")
    finding = inspect_socket_budget(cfg, "firecracker-v1.0.0")
    assert finding.level == "warn" and finding.details["max_id_length"] == 50
