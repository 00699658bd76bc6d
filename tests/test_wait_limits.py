"""Waits as long as C accepts them: -o, -r and --drain-timeout beyond what
one call of poll() or Event.wait() can take, and -r near zero.

C takes any -o and -r from 0 to a finite double (SPEC §7).  A wait longer
than the platform can express must still be a wait (a very long one), never
an exception: poll() takes a C int of milliseconds (24.8 days at most) and
Event.wait() a time_t.  A re-resolution period near zero must not spin.
"""
import os
import signal
import subprocess

import pytest

from conftest import (assert_stays, connect, cpu_seconds, echoed, exchange, ours_spipe,
                      read_text, terminate, thread_and_fd_count, wait_for, wrapped)

RUN_TIMEOUT = 30

# Beyond poll()'s longest wait (2147483.647 s), far beyond it, beyond
# Event.wait()'s (threading.TIMEOUT_MAX, 9223372036 s on Linux), and about
# the largest C takes.
HUGE = ["2147484", "1e9", "1e10", "1e300"]


@pytest.fixture
def tunnel(procs, keyfile, echo):
    """Factory: ours -e -> ours -d -> echo, both with EXTRA; the two Daemons (e, d)."""
    return lambda *extra: procs.chain(echo().addr, keyfile, e_extra=extra, d_extra=extra)


@pytest.mark.parametrize("seconds", HUGE)
def test_huge_o_connects_end_to_end(tunnel, keyfile, seconds):
    e, d = tunnel("-o", seconds)
    payload = os.urandom(100_000)
    assert exchange(e.addr, payload, timeout=RUN_TIMEOUT) == payload
    r = subprocess.run(ours_spipe("-o", seconds, "-t", d.addr, "-k", keyfile), input=b"spipe",
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"spipe", b"")
    assert [e.log_text(), d.log_text()] == ["", ""]


def threads(pid):
    return thread_and_fd_count(pid)[0]


@pytest.mark.parametrize("seconds", HUGE)
def test_huge_r_keeps_the_re_resolver(procs, keyfile, echo, seconds):
    """The re-resolver thread lives on (as many threads as with the default -r)."""
    target = echo()
    p = procs.spiped("-d", target.addr, keyfile, "-r", seconds)
    twin = procs.spiped("-d", target.addr, keyfile)
    r = subprocess.run(ours_spipe("-t", p.addr, "-k", keyfile), input=b"served",
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert (r.returncode, r.stdout) == (0, b"served"), r.stderr
    assert wait_for(lambda: threads(p.pid) == threads(twin.pid)), (threads(p.pid), threads(twin.pid))
    assert terminate(p) == 0
    assert p.log_text() == ""


# "moving.invalid" resolves to 127.0.0.1 and the port in PORTFILE; each
# look-up of it adds a line to CALLS.
MOVING = """
import socket
real = socket.getaddrinfo
def fake(host, port, *args, **kw):
    if host == "moving.invalid":
        with open(%r, "a") as calls:
            calls.write("x\\n")
        with open(%r) as f:
            return real("127.0.0.1", f.read(), *args, **kw)
    return real(host, port, *args, **kw)
socket.getaddrinfo = fake
"""


def test_tiny_r_does_not_spin(procs, keyfile, echo, tmp_path):
    """-r 1e-300 (C spins on it): at most one look-up a second, still re-resolving."""
    first, second = echo(), echo()
    portfile, calls = tmp_path / "port", tmp_path / "calls"
    portfile.write_text(first.addr.rsplit(":", 1)[1])
    p = procs.spiped("-d", "moving.invalid:0", keyfile, "-r", "1e-300",
                     impl=wrapped(tmp_path, MOVING % (str(calls), str(portfile))))
    source = p.addr
    before, looked_up = cpu_seconds(p.pid), len(read_text(calls).splitlines())
    assert_stays(lambda: p.poll() is None, 2.0)  # a window of about 2 s
    used, looked_up = cpu_seconds(p.pid) - before, len(read_text(calls).splitlines()) - looked_up
    assert used < 0.25, "%.2f s of CPU in about 2 s" % used  # a busy loop takes one core
    assert looked_up <= 5, "%d look-ups in about 2 s" % looked_up

    portfile.write_text(second.addr.rsplit(":", 1)[1])

    def served_by_second():
        r = subprocess.run(ours_spipe("-t", source, "-k", keyfile), input=b"moved",
                           capture_output=True, timeout=RUN_TIMEOUT)
        return r.stdout == b"moved" and second.connections > 0
    assert wait_for(served_by_second, timeout=20)
    assert terminate(p) == 0
    assert p.log_text() == ""


@pytest.mark.parametrize("seconds", HUGE + ["inf"])
def test_huge_drain_timeout_drains(tunnel, seconds):
    """SIGTERM with --drain-timeout huge: the live connection is served to its end."""
    e, d = tunnel("--drain-timeout", seconds)
    with connect(e.addr, timeout=RUN_TIMEOUT) as s:
        assert echoed(s, b"before") == b"before"
        e.send_signal(signal.SIGTERM)
        assert_stays(lambda: e.poll() is None, 1.0, what="gone instead of draining")
        assert echoed(s, b"while draining") == b"while draining"
    assert e.wait(timeout=RUN_TIMEOUT) == 0
    assert [e.log_text(), d.log_text()] == ["", ""]
