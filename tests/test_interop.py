"""Interoperability with C spiped 1.6.2: every pairing of -e and -d, both ours and C.

Each test builds the chain

    test client -> spiped -e -> spiped -d -> target

where the -e and -d ends are ours or C (C <-> C is the control that shows
the test itself is sound), and checks that the bytes arrive intact in both
directions, end of stream included.
"""
import hashlib
import os
import socket
import sys
import threading
import time

import pytest

import conftest
from conftest import (SPIPED_PY, TargetServer, connect, drain, exchange, free_port, have_ipv6,
                      need_c, recv_all, sha, tcp_addr, wait_for)

pytestmark = need_c

# (-e implementation, -d implementation)
PAIRS = [("ours", "c"), ("c", "ours"), ("ours", "ours"), ("c", "c")]
PAIR_IDS = ["%s-e_%s-d" % p for p in PAIRS]
MIXED = PAIRS[:2]

# Handshake flavours: (-e flags, -d flags).
MODES = {
    "pfs": ((), ()),
    "fast-both": (("-f",), ("-f",)),
    "fast-e-only": (("-f",), ()),
    "fast-d-only": ((), ("-f",)),
}

SIZES = [0, 1, 1023, 1024, 1025, 1 << 20, 16 << 20]


# -- helpers -----------------------------------------------------------------


def check_echo(addr, payload, timeout=30.0):
    """PAYLOAD comes back whole from ADDR, and then the end of the stream."""
    conftest.check_echo(addr, payload, timeout, until_eof=True)


class LateReplyTarget(TargetServer):
    """A target that reads each connection to EOF, waits DELAY, then replies.

    The reply is SHA-256(received) followed by REPLY_SIZE random bytes, so the
    client can check both that the target got everything and that data sent
    after the client's half-close still comes back.
    """

    backlog = 16

    def __init__(self, addr, delay=0.3, reply_size=100000):
        self.delay = delay
        self.reply_size = reply_size
        self.results = []   # (received bytes, saw_eof, reply bytes)
        super().__init__(addr if addr.startswith("/") else None)

    def handle(self, c):
        c.settimeout(15)
        got, how = drain(c, limit=1 << 30)
        eof = how == "eof"
        reply = b""
        try:
            if not eof:
                return
            time.sleep(self.delay)
            reply = hashlib.sha256(got).digest() + os.urandom(self.reply_size)
            c.sendall(reply)
            c.shutdown(socket.SHUT_WR)
        finally:
            with self.lock:
                self.results.append((got, eof, reply))

    def wait_results(self, count, timeout=10.0):
        def finished():
            with self.lock:
                return len(self.results) >= count and (list(self.results),)

        done = wait_for(finished, timeout)
        if done:
            return done[0]
        raise AssertionError("target finished %d of %d connections" % (len(self.results), count))


@pytest.fixture
def late_target(closing):
    """Makes LateReplyTargets, closed after the test."""
    return lambda addr=tcp_addr(0), **kw: closing(LateReplyTarget(addr, **kw))


# -- payloads through every pairing and handshake flavour --------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_payload_sizes_both_directions(procs, keyfile, echo, pair, mode):
    """Every size goes out and comes back (echo) at the same time, intact."""
    e_flags, d_flags = MODES[mode]
    target = echo()
    e, _ = procs.chain(target.addr, keyfile, *pair, e_extra=e_flags, d_extra=d_flags)
    # 16 MiB for every mixed pair in every mode, and for the rest once (PFS).
    big = pair in MIXED or mode == "pfs"
    sizes = [n for n in SIZES if big or n < (16 << 20)]
    for size in sizes:
        check_echo(e.addr, os.urandom(size))
    assert target.connections == len(sizes)
    assert target.total_received() == sum(sizes)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_require_pfs_both_sides(procs, keyfile, echo, pair):
    """-g on both ends: a full Diffie-Hellman exchange passes both checks."""
    target = echo()
    e, _ = procs.chain(target.addr, keyfile, *pair, e_extra=("-g",), d_extra=("-g",))
    for size in (1, 5000):
        check_echo(e.addr, os.urandom(size))


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_half_close_late_reply(procs, keyfile, late_target, pair):
    """Client half-closes; the target sees EOF and its later reply still arrives."""
    target = late_target(delay=0.3)
    e, _ = procs.chain(target.addr, keyfile, *pair)
    payload = os.urandom(3000)
    s = connect(e.addr, timeout=15)
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        got = recv_all(s)
    finally:
        s.close()
    received, eof, reply = target.wait_results(1)[0]
    assert eof, "target did not see EOF after the client's half-close"
    assert received == payload
    assert len(reply) == 32 + 100000
    assert got == reply
    assert time.monotonic() - started >= 0.25


# -- address forms -----------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_unix_sockets_everywhere(procs, keyfile, echo, pair, tmp_path):
    """Unix sockets for the plaintext source, the encrypted hop and the target."""
    e_sock, d_sock, t_sock = (str(tmp_path / n) for n in ("e.sock", "d.sock", "t.sock"))
    assert len(t_sock) < 100, "tmp_path too long for a unix socket"
    target = echo(t_sock)
    e, _ = procs.chain(t_sock, keyfile, *pair, e_source=e_sock, d_source=d_sock)
    for size in (0, 1025, 200000):
        check_echo(e.addr, os.urandom(size))
    assert target.total_received() == 1025 + 200000


@pytest.mark.skipif(not have_ipv6(), reason="no IPv6 loopback (::1) here")
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_ipv6_loopback(procs, keyfile, echo, pair):
    target = echo(tcp_addr(0, "::1"))
    e_source = tcp_addr(free_port("::1"), "::1")
    d_source = tcp_addr(free_port("::1"), "::1")
    e, _ = procs.chain(target.addr, keyfile, *pair, e_source=e_source, d_source=d_source)
    for size in (1, 70000):
        check_echo(e.addr, os.urandom(size))
    assert all(peer[0] == "::1" for peer in target.peers)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_hostname_port_form(procs, keyfile, echo, pair):
    """'localhost:port' for sources and targets (resolved with getaddrinfo)."""
    target = echo()
    port = int(target.addr.rsplit(":", 1)[1])
    e_source = "localhost:%d" % free_port()
    d_source = "localhost:%d" % free_port()
    e, _ = procs.chain("localhost:%d" % port, keyfile, *pair, e_source=e_source,
                       d_source=d_source)
    check_echo(e.addr, os.urandom(5000))


# -- concurrency -------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pair", PAIRS[:3], ids=PAIR_IDS[:3])
def test_fifty_concurrent_connections(procs, keyfile, echo, pair):
    """50 connections open at once, each moving 64 KiB both ways, all intact.

    spiped listens with a backlog of 10, and connecting faster than a busy
    daemon accepts can overflow it (the kernel then resets connections, C's
    as well as ours).  So at most 5 connections at a time may be waiting to
    be proven up (one byte echoed end to end); all 50 then stay open until
    every one is up, and only then does the bulk data flow on all of them.
    """
    count = 50
    target = echo()
    e, _ = procs.chain(target.addr, keyfile, *pair)
    payloads = [os.urandom(65536) for _ in range(count)]
    results = [None] * count
    pending = threading.BoundedSemaphore(5)
    all_up = threading.Barrier(count, timeout=40)

    def one(i):
        try:
            with pending:
                s = connect(e.addr, timeout=40)
                s.sendall(payloads[i][:1])
                first = s.recv(1)
            all_up.wait()
            results[i] = first + exchange(e.addr, payloads[i][1:], 40, sock=s, until_eof=True)
        except BaseException as error:  # reported below
            all_up.abort()
            results[i] = error

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not any(t.is_alive() for t in threads)
    bad = [i for i in range(count)
           if not isinstance(results[i], bytes) or sha(results[i]) != sha(payloads[i])]
    assert not bad, "connections %s failed: %r" % (bad, results[bad[0]])
    assert target.connections == count
    assert sorted(sha(r) for r in target.received) == sorted(sha(p) for p in payloads)


# -- keys --------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
def test_empty_key_file(procs, echo, pair, tmp_path):
    """An empty key file is legal: K = SHA256(b'') on both ends."""
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    os.chmod(empty, 0o600)
    target = echo()
    e, _ = procs.chain(target.addr, str(empty), *pair)
    check_echo(e.addr, os.urandom(3000))


@pytest.mark.parametrize("side", ["e", "d"])
def test_key_on_stdin(procs, echo, tmp_path, side):
    """Ours with '-k -' reads the key from stdin; C reads the same bytes from a file."""
    secret = os.urandom(48)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(secret)
    os.chmod(keyfile, 0o600)
    target = echo()

    def start(mode, to):
        if mode == "-" + side:
            return procs.spiped(mode, to, "-", input=secret)
        return procs.spiped(mode, to, str(keyfile), impl="c")

    e = start("-e", start("-d", target.addr).addr)
    check_echo(e.addr, os.urandom(2000))


# -- target with several addresses -------------------------------------------


RESOLVER_WRAPPER = r'''
import runpy, socket, sys
real = socket.getaddrinfo
def fake(host, port, *args, **kw):
    if host == "multi.invalid":
        port = int(port)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    return real(host, port, *args, **kw)
socket.getaddrinfo = fake
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def resolving(tmp_path):
    """The command line maker (for Procs.spiped's IMPL) of ours under RESOLVER_WRAPPER."""
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(RESOLVER_WRAPPER)
    return lambda *args: [sys.executable, str(wrapper), SPIPED_PY, *args]


def _refused(host, port):
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@pytest.mark.parametrize("impl", ["ours", "c"])
def test_localhost_first_address_refused(procs, keyfile, echo, impl):
    """With the real resolver: 'localhost' -> ::1 first, target only on 127.0.0.1."""
    infos = socket.getaddrinfo("localhost", 80, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               socket.IPPROTO_TCP)
    hosts = [i[4][0] for i in infos]
    if len(hosts) < 2 or hosts[0] != "::1" or "127.0.0.1" not in hosts:
        pytest.skip("getaddrinfo('localhost') gives %s here, not ::1 then 127.0.0.1; "
                    "test_first_target_address_refused covers ours" % hosts)
    target = echo()
    t_port = int(target.addr.rsplit(":", 1)[1])
    assert _refused("::1", t_port)
    pair = (impl, impl)
    e, _ = procs.chain("localhost:%d" % t_port, keyfile, *pair)
    check_echo(e.addr, os.urandom(4000), timeout=15)
    assert target.connections == 1


@pytest.mark.skipif(not have_ipv6(), reason="no IPv6 loopback (::1) here")
@pytest.mark.parametrize("side", ["e", "d"])
def test_first_target_address_refused(procs, keyfile, echo, tmp_path, side):
    """A target name giving [::1, 127.0.0.1] with only 127.0.0.1 listening: the
    connection falls through to the second address.

    This machine's 'localhost' has a single address, so ours runs under a
    wrapper whose getaddrinfo() answers 'multi.invalid' with ::1 then
    127.0.0.1 (C cannot be given such a resolver; its own -t list order is
    what the C test would exercise).
    """
    multi = resolving(tmp_path)
    target = echo()
    t_port = int(target.addr.rsplit(":", 1)[1])
    d = procs.spiped("-d", "multi.invalid:%d" % t_port if side == "d" else target.addr, keyfile,
                     impl=multi)
    d_port = int(d.addr.rsplit(":", 1)[1])
    e = procs.spiped("-e", "multi.invalid:%d" % d_port if side == "e" else d.addr, keyfile,
                     impl=multi)
    assert _refused("::1", d_port if side == "e" else t_port)
    for size in (1, 4000):
        check_echo(e.addr, os.urandom(size), timeout=15)
    assert target.connections == 2
