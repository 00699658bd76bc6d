"""Load: many short connections in a row, and many bulk transfers at once.

Every byte is checked (SHA-256 per connection) and every connection must
succeed: a single corrupted, missing or refused connection fails the test.
The pairs are ours on both sides and mixed C/ours (C -e -> ours -d,
ours -e -> C -d), each run with -n 0 so the limit plays no part.

The default sizes keep this file under a minute on two cores;
SPIPED_HEAVY=1 selects heavier ones: 5000 sequential connections instead
of 1000, and 4 MiB each way per concurrent connection instead of 1 MiB.
"""
import hashlib
import os
import random
import socket
import threading
import time

import pytest

from conftest import TargetServer, connect, need_c, wait_for
from test_faults import Baseline, assert_no_leak

HEAVY = os.environ.get("SPIPED_HEAVY") == "1"
SEQUENTIAL = 5000 if HEAVY else 1000
CONCURRENT = 100
PER_CONNECTION = (4 << 20) if HEAVY else (1 << 20)


def start_pair(procs, keyfile, target, e_impl="ours", d_impl="ours", extra=()):
    """e -> d -> TARGET, both with -n 0 and EXTRA; returns (e_addr, [(name, daemon) of ours])."""
    both = ("-n", "0", *extra)
    e, d = procs.chain(target, keyfile, e_impl, d_impl, e_extra=both, d_extra=both)
    return e.addr, [(name, p) for name, p, impl in (("-d", d, d_impl), ("-e", e, e_impl))
                    if impl == "ours"]


class Echo(TargetServer):
    """A threaded echo target (its own, so that load tests control the buffers)."""

    backlog = 1024

    def __init__(self):
        self.errors = []
        super().__init__()

    @property
    def accepted(self):
        return self.connections

    def handle(self, conn):
        conn.settimeout(60)
        try:
            while True:
                data = conn.recv(262144)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.errors.append(repr(e))


def transfer(addr, data, timeout=60, sock=None):
    """Send DATA while reading; half-close; (sha256 of what came back, length, errors).

    SOCK: an already connected socket to use instead of connecting to ADDR.
    """
    digest = hashlib.sha256()
    count = [0]
    errors = []
    with sock or connect(addr, timeout=timeout) as s:
        def send():
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError as e:
                errors.append("send: %r" % (e,))

        t = threading.Thread(target=send, daemon=True)
        t.start()
        try:
            while True:
                chunk = s.recv(262144)
                if not chunk:
                    break
                digest.update(chunk)
                count[0] += len(chunk)
        except OSError as e:
            errors.append("recv: %r" % (e,))
        t.join(timeout)
    return digest.hexdigest(), count[0], errors


def connect_through(addr, echo, count, timeout=10):
    """COUNT connections to ADDR, each one in turn established up to ECHO.

    One at a time: a burst of connects beyond the listen backlog (10, as C)
    makes the kernel answer with SYN cookies, and a client whose cookie ACK
    was dropped is later reset.  C spiped behaves the same; that is the
    kernel, not the relay, so the load starts once all are up.
    """
    socks = []
    for i in range(count):
        before = echo.accepted
        s = connect(addr, timeout=timeout)
        socks.append(s)
        wait_for(lambda: echo.accepted > before, timeout, step=0.001)
        assert echo.accepted > before, "connection %d never reached the target" % i
    return socks


PAIRS = [
    pytest.param("ours", "ours", id="ours-ours"),
    pytest.param("c", "ours", id="C-e-ours-d", marks=need_c),
    pytest.param("ours", "c", id="ours-e-C-d", marks=need_c),
]


@pytest.mark.timeout(300 if HEAVY else 90)
@pytest.mark.parametrize("e_impl,d_impl", PAIRS)
def test_sequential_connections(procs, keyfile, e_impl, d_impl):
    """1000 short echo connections one after another (-f on both ends): all intact."""
    echo = Echo()
    try:
        e_addr, watched = start_pair(procs, keyfile, echo.addr, e_impl, d_impl, extra=("-f",))
        rng = random.Random(SEQUENTIAL)
        transfer(e_addr, b"warm-up")
        baselines = {name: Baseline(p.pid) for name, p in watched}
        failures = []
        started = time.monotonic()
        for i in range(SEQUENTIAL):
            data = rng.randbytes(1024)
            digest, count, errors = transfer(e_addr, data, timeout=10)
            if digest != hashlib.sha256(data).hexdigest() or errors:
                failures.append("connection %d: %d of 1024 bytes back, %s" % (i, count, errors))
                if len(failures) >= 10:
                    break
        elapsed = time.monotonic() - started
        assert not failures, "\n".join(failures)
        assert not echo.errors, echo.errors[:5]
        for name, p in watched:
            assert p.poll() is None
            assert_no_leak(p.pid, baselines[name], name)
        print("%d sequential connections in %.1fs (%.0f/s)"
              % (SEQUENTIAL, elapsed, SEQUENTIAL / elapsed))
    finally:
        echo.close()


@pytest.mark.timeout(600 if HEAVY else 120)
@pytest.mark.parametrize("e_impl,d_impl", PAIRS)
def test_concurrent_bulk_transfers(procs, keyfile, e_impl, d_impl):
    """100 connections at once, each echoing its own random data: all intact."""
    echo = Echo()
    try:
        e_addr, watched = start_pair(procs, keyfile, echo.addr, e_impl, d_impl)
        transfer(e_addr, b"warm-up")
        baselines = {name: Baseline(p.pid) for name, p in watched}
        payloads = [random.Random(i).randbytes(PER_CONNECTION) for i in range(CONCURRENT)]
        results = [None] * CONCURRENT
        socks = connect_through(e_addr, echo, CONCURRENT)
        go = threading.Barrier(CONCURRENT, timeout=30)

        def run(i):
            go.wait()
            results[i] = transfer(e_addr, payloads[i], timeout=90, sock=socks[i])

        started = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        elapsed = time.monotonic() - started
        failures = []
        for i, (payload, result) in enumerate(zip(payloads, results)):
            if result is None:
                failures.append("connection %d: still running" % i)
                continue
            digest, count, errors = result
            if digest != hashlib.sha256(payload).hexdigest() or errors:
                failures.append("connection %d: %d of %d bytes back intact=%s %s"
                                % (i, count, len(payload),
                                   digest == hashlib.sha256(payload).hexdigest(), errors))
        assert not failures, "%d of %d failed:\n%s" % (len(failures), CONCURRENT,
                                                       "\n".join(failures[:10]))
        assert not echo.errors, echo.errors[:5]
        for name, p in watched:
            assert p.poll() is None
            assert_no_leak(p.pid, baselines[name], name)
        total = 2 * CONCURRENT * PER_CONNECTION / (1 << 20)
        print("%d x %d KiB each way in %.1fs (%.0f MiB/s through the pair)"
              % (CONCURRENT, PER_CONNECTION >> 10, elapsed, total / elapsed))
    finally:
        echo.close()
