"""Hypothesis strategies shared by the property-based tests (tests/unit/test_properties_*)."""

from __future__ import annotations

import ipaddress
import string

from hypothesis import strategies as st

#: The documented id length (README, the facts note), stated here rather than imported so
#: that a changed bound in the code fails the properties.
ID_MAX_LENGTH = 64
#: The documented id alphabet (README, ``names.ID_RULE``): ASCII letters, digits and '-'.
ID_ALPHABET = string.ascii_letters + string.digits + "-"

valid_ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=ID_MAX_LENGTH)

#: Characters an id may not hold but that look close: punctuation, whitespace, a newline,
#: NUL, '/', '.', '_', and non-ASCII letters and digits (which the jailer itself accepts).
_bad_chars = st.sampled_from([*"_./ \t\n\x00:=@+~\"'\\", "é", "Ж", "٣", "\uff11", "ß", "\u200b"])


@st.composite
def invalid_ids(draw: st.DrawFn) -> str:
    """Strings just outside the id rule: too long, empty, or one bad character."""
    kind = draw(st.sampled_from(["long", "empty", "bad-char"]))
    if kind == "empty":
        return ""
    if kind == "long":
        return draw(st.text(ID_ALPHABET, min_size=ID_MAX_LENGTH + 1, max_size=ID_MAX_LENGTH + 8))
    base = draw(st.text(ID_ALPHABET, max_size=ID_MAX_LENGTH - 1))
    at = draw(st.integers(0, len(base)))
    return base[:at] + draw(_bad_chars) + base[at:]


#: Anything: valid ids, near misses and arbitrary text.
any_id_text = st.one_of(valid_ids, invalid_ids(), st.text(max_size=ID_MAX_LENGTH + 4))


def is_documented_id(value: str) -> bool:
    """The documented rule, stated independently of the code under test."""
    return 1 <= len(value) <= ID_MAX_LENGTH and all(c in ID_ALPHABET for c in value)


ipv4_addresses = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@st.composite
def ipv4_interfaces(draw: st.DrawFn, min_prefix: int = 0, max_prefix: int = 32) -> str:
    """``a.b.c.d/len`` with any address and prefix, biased to private ranges."""
    prefix = draw(st.integers(min_prefix, max_prefix))
    base = draw(
        st.one_of(
            ipv4_addresses,
            st.sampled_from(["10.0.0.0", "172.16.0.0", "172.30.0.0", "192.168.0.0"]).map(
                ipaddress.IPv4Address
            ),
        )
    )
    net = ipaddress.IPv4Network(f"{base}/{prefix}", strict=False)
    offset = draw(st.integers(0, net.num_addresses - 1))
    return f"{net.network_address + offset}/{prefix}"
