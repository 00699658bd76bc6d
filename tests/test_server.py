"""The server's shape and the life of one connection, against the running daemon.

Server is a socketserver.ThreadingMixIn server without a pool; a
connection ends in one teardown from any stage of its set-up; -d drops a
client at once when its target refuses, and makes no Diffie-Hellman key
pair for a client that has not proved the key; signal handlers only
record and wake the loop; an unexpected exception in either relay ends
the whole connection and is logged.

Some tests run spiped.py's main() from a small wrapper script that first
patches one function (to count calls, to widen a window, or to raise),
so the daemon process itself shows the behaviour.
"""
import contextlib
import os
import signal
import shutil
import socketserver
import subprocess
import sys

import pytest

import spiped
from conftest import (ROOT, Notify, TargetServer, connect, free_port, key_of, read_text,
                      recv_exact, need_c, tcp_addr, wait_closed, wait_for, wait_listening,
                      wrapped)



class HoldingTarget(TargetServer):
    """A target that says hello, then reads until EOF; remembers when each EOF came."""

    def __init__(self, addr=None):
        self.eofs = 0
        super().__init__(addr)

    def handle(self, conn):
        conn.settimeout(60)
        try:
            conn.sendall(b"hello")
            while conn.recv(65536):
                pass
        except OSError:
            pass
        with self.lock:
            self.eofs += 1


def handshake(sock, keyfile):
    """A client's fast handshake on SOCK with the key in KEYFILE; (sealer, opener)."""
    return spiped.handshake(sock, key_of(keyfile), client=True, fast=True,
                            deadline=spiped.deadline_in(10))


@pytest.fixture
def holding(closing):
    """Makes HoldingTargets, closed after the test."""
    return lambda: closing(HoldingTarget())


# ---------------------------------------------------------------------------
# The shape
# ---------------------------------------------------------------------------


def test_server_is_a_threading_mixin_server_without_a_pool():
    assert issubclass(spiped.Server, socketserver.ThreadingMixIn)
    assert issubclass(spiped.Server, socketserver.TCPServer)
    assert "process_request" not in spiped.Server.__dict__
    assert spiped.Server.daemon_threads and not spiped.Server.block_on_close
    assert issubclass(spiped.Connection, socketserver.BaseRequestHandler)
    assert not hasattr(spiped, "Workers")


# ---------------------------------------------------------------------------
# 1. One teardown from any stage
# ---------------------------------------------------------------------------


def test_drain_timeout_with_a_client_in_its_handshake(procs, tmp_path, keyfile, holding):
    """SIGTERM with --drain-timeout cuts a connection whose target is not dialled yet."""
    target = holding()
    d = procs.spiped("-d", target.addr, keyfile, "-o", "30", "--drain-timeout", "0.5")
    with connect(d.addr) as s:
        s.settimeout(10)
        assert len(s.recv(32)) == 32  # the daemon's nonce: the handshake is under way
        d.send_signal(signal.SIGTERM)
        assert d.wait(timeout=10) == 0, d.log_text()
        assert wait_closed(s, 10) is not None
    assert "Traceback" not in d.log_text()


# ---------------------------------------------------------------------------
# 2. -d: a target that refuses ends the handshake at once
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["ours", pytest.param("c", marks=need_c)])
def test_refused_target_drops_the_client_at_once(procs, keyfile, impl):
    """Long before -o: the connect to the target runs beside the handshake."""
    refused = tcp_addr(free_port())  # nothing listens there
    d = procs.spiped("-d", refused, keyfile, "-o", "30", impl=impl)
    with connect(d.addr) as s:
        took = wait_closed(s, 20)  # the client sends nothing at all
    assert took is not None, "client still connected after 20 s"
    assert took < 5, "dropped only after %.1f s" % took
    assert d.poll() is None


# ---------------------------------------------------------------------------
# 3. -d: no key pair for a client that has not proved the key
# ---------------------------------------------------------------------------

COUNT_MODEXP = """
calls = [0]
real_modexp = spiped._modexp
def counting_modexp(base, exponent):
    calls[0] += 1
    with open(os.environ["MODEXP_COUNT"], "w") as f:  # the daemon ends with os._exit()
        f.write(str(calls[0]))
    return real_modexp(base, exponent)
spiped._modexp = counting_modexp
"""


def test_wrong_key_clients_cost_no_exponentiation(procs, tmp_path, keyfile, otherkey, holding):
    """20 clients with the wrong key: no modular exponentiation at all; a good one: two."""
    target = holding()
    count = tmp_path / "count"
    d = procs.spiped("-d", target.addr, keyfile, "-o", "30", impl=wrapped(tmp_path, COUNT_MODEXP),
                     env=dict(os.environ, MODEXP_COUNT=str(count)))
    for _ in range(20):
        with connect(d.addr) as s:
            with pytest.raises(spiped.HandshakeError):
                handshake(s, otherkey)
    with connect(d.addr) as s:
        handshake(s, keyfile)
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=10) == 0, d.log_text()
    # The good client: the daemon's own y, then the shared value.
    assert read_text(count) == "2"


# ---------------------------------------------------------------------------
# 4. Signal handlers only record and wake the loop
# ---------------------------------------------------------------------------

SLOW_FULL = """
real_full = spiped.Server.full
def slow_full(self):
    # Called with Server.lock held: announce it, and hold it a while.
    with open(os.environ["LOCK_HELD"], "a") as f:
        f.write("held\\n")
    time.sleep(1.0)
    return real_full(self)
spiped.Server.full = slow_full
"""


def test_sigterm_while_the_loop_holds_its_lock(procs, tmp_path, keyfile, holding):
    """A signal that lands while the accept loop holds Server.lock still drains and exits."""
    target = holding()
    held = tmp_path / "held"
    d = procs.spiped("-d", target.addr, keyfile, impl=wrapped(tmp_path, SLOW_FULL),
                     env=dict(os.environ, LOCK_HELD=str(held)))
    before = read_text(held).count("held")
    assert wait_for(lambda: read_text(held).count("held") > before, 10)
    d.send_signal(signal.SIGTERM)  # lands while slow_full() holds the lock
    assert d.wait(timeout=10) == 0, d.log_text()


# ---------------------------------------------------------------------------
# A drain ends only after its connections' lines are written
# ---------------------------------------------------------------------------

SLOW_EVENT = """
real_event = spiped.log.event
def slow_event(msg):
    if "closed" in msg or "dropped" in msg:
        time.sleep(0.3)      # a slow stderr (journald under load)
    real_event(msg)
spiped.log.event = slow_event
"""


@pytest.mark.parametrize("drain", [(), ("--drain-timeout", "0.5")])
def test_sigterm_exit_waits_for_the_connections_lines(procs, tmp_path, keyfile, holding, drain):
    """SIGTERM with live connections: the daemon exits 0 after each one's last line.

    The drain used to end as soon as the count of live connections fell to
    zero, before the connection's closing line was written: the line was
    lost, and under systemd the interpreter aborted (SIGABRT) on stderr's
    lock held by a relay thread still writing it as the process exited.
    """
    target = holding()
    notify = Notify(str(tmp_path / "notify"))
    notify.follow()  # read from the start: a full queue would drop STOPPING=1
    try:
        d = procs.spiped("-d", target.addr, keyfile, "--log-connections", *drain,
                         impl=wrapped(tmp_path, SLOW_EVENT),
                         env=dict(os.environ, NOTIFY_SOCKET=notify.env))
        clients = []
        for _ in range(4):
            s = connect(d.addr)
            clients.append(s)
            _, opener = handshake(s, keyfile)
            assert opener.open(recv_exact(s, spiped.PACKET)) == b"hello"  # both relays run
        d.send_signal(signal.SIGTERM)
        notify.wait_for_text("STOPPING=1")  # the drain has begun
        for s in clients:
            s.close()
        assert d.wait(timeout=20) == 0, d.log_text()
    finally:
        notify.close()
    text = d.log_text()
    assert text.count("closed:") + text.count("dropped (") == 4, text
    assert "Fatal Python error" not in text and "Traceback" not in text, text


# ---------------------------------------------------------------------------
# 7. Any exception in either relay ends the whole connection
# ---------------------------------------------------------------------------

RAISE_IN = """
def boom(self, data):
    raise ValueError("boom in the relay")
spiped.%s = boom
"""


@pytest.mark.parametrize("where", ["PacketOpener.transform", "PacketSealer.transform"])
def test_unexpected_relay_exception_closes_both_sockets(procs, tmp_path, keyfile, holding,
                                                         where):
    """Both the client and the target see their connection end, and the error is logged."""
    target = holding()
    d = procs.spiped("-d", target.addr, keyfile, "-o", "30",
                     impl=wrapped(tmp_path, RAISE_IN % where))
    with connect(d.addr) as s:
        sealer, _ = handshake(s, keyfile)
        s.sendall(sealer.seal(b"data for the target"))
        assert wait_closed(s, 10) is not None, "client still connected"
    assert wait_for(lambda: target.eofs == 1, 10), "target still connected"
    text = d.log_text()
    assert "internal error" in text and "ValueError: boom in the relay" in text, text
    # The daemon goes on serving.
    assert d.poll() is None


# ---------------------------------------------------------------------------
# Socket options: set once on the listener, inherited by accepted sockets
# ---------------------------------------------------------------------------


def _keepalive_timers(port_filter):
    """ss's timer field for each established TCP socket matching PORT_FILTER."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", port_filter],
                         capture_output=True, text=True, timeout=10).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(not shutil.which("ss"), reason="ss (iproute2) not installed")
@pytest.mark.parametrize("flags", [(), ("-j",)])
def test_keepalive_on_both_sockets_unless_j(procs, keyfile, holding, flags):
    target = holding()
    d = procs.spiped("-d", target.addr, keyfile, *flags)
    sport = d.addr.rsplit(":", 1)[1]
    tport = target.addr.rsplit(":", 1)[1]
    with connect(d.addr) as s:
        handshake(s, keyfile)
        assert wait_for(lambda: target.connections == 1, 10)
        accepted = _keepalive_timers("( sport = :%s )" % sport)
        dialled = _keepalive_timers("( dport = :%s )" % tport)
        assert len(accepted) == 1 and len(dialled) == 1, (accepted, dialled)
        if not flags:  # ss shows a pending retransmission timer instead, for a moment
            both = lambda: all("timer:(keepalive" in line for line in
                               _keepalive_timers("( sport = :%s )" % sport)
                               + _keepalive_timers("( dport = :%s )" % tport))
            assert wait_for(both, 10), (accepted, dialled)
        else:
            assert not any("keepalive" in line for line in accepted + dialled)


# ---------------------------------------------------------------------------
# 4 (continued). As PID 1 the default actions do nothing; the handlers exit
# ---------------------------------------------------------------------------


def _child_pid(pid, timeout=10):
    """The single child of PID (the process unshare forked into the new namespace)."""
    path = "/proc/%d/task/%d/children" % (pid, pid)
    found = wait_for(lambda: read_text(path).split(), timeout)
    assert found, "no child of %d" % pid
    return int(found[0])


@contextlib.contextmanager
def as_pid_1(procs, source, *args):
    """Ours -F -s SOURCE ARGS as PID 1 of a PID namespace (unshare --pid --fork).

    Yields (unshare's Daemon, the PID of ours); ours is killed at the end if
    unshare still runs (it passes no signal on, so only PID 1's end ends it).
    """
    outer = procs.daemon(["unshare", "--pid", "--fork", sys.executable,
                          os.path.join(ROOT, "spiped.py"), "-F", "-s", source, *args], source)
    pid1 = _child_pid(outer.pid)
    try:
        yield outer, pid1
    finally:
        if outer.poll() is None:
            os.kill(pid1, signal.SIGKILL)
            outer.wait(timeout=10)


def _can_unshare_pid():
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True,
                          timeout=10).returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs root and unshare --pid")
def test_pid1_exits_0_on_sigint_with_a_live_connection(procs, keyfile, holding):
    """As PID 1 SIGINT's default action would do nothing; the handler exits 0 at once."""
    target = holding()
    source = tcp_addr(free_port())
    with as_pid_1(procs, source, "-d", "-t", target.addr, "-k", keyfile) as (outer, pid1):
        with connect(source) as s:
            handshake(s, keyfile)
            assert wait_for(lambda: target.connections == 1, 10)
            os.kill(pid1, signal.SIGINT)
            assert outer.wait(timeout=10) == 0, outer.log_text()
    assert "Traceback" not in outer.log_text()


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs root and unshare --pid")
def test_pid1_second_sigterm_exits_0_removing_socket_files(procs, tmp_path, keyfile, holding):
    """As PID 1 a second SIGTERM during the drain exits 0 at once, its unix
    source's and --metrics' socket files removed."""
    target = holding()
    source, metrics = str(tmp_path / "source.sock"), str(tmp_path / "metrics.sock")
    with as_pid_1(procs, source, "-d", "-t", target.addr, "-k", keyfile,
                  "--metrics", metrics) as (outer, pid1):
        wait_listening(metrics, outer)
        with connect(source) as s:
            handshake(s, keyfile)
            assert wait_for(lambda: target.connections == 1, 10)
            os.kill(pid1, signal.SIGTERM)
            assert wait_for(lambda: not os.path.lexists(source)), "the drain did not begin"
            assert outer.poll() is None
            os.kill(pid1, signal.SIGTERM)
            assert outer.wait(timeout=10) == 0, outer.log_text()
    assert not os.path.lexists(metrics)
    assert "Traceback" not in outer.log_text()


# ---------------------------------------------------------------------------
# Bursts: the listen backlog and an accept loop that drains the queue
# ---------------------------------------------------------------------------


def _listen_backlog(port):
    """The backlog of the socket listening on PORT, as ss shows it (Send-Q); None: ss is missing."""
    if not shutil.which("ss"):
        if os.environ.get("CI") == "true":
            pytest.fail("ss (iproute2) is required with CI=true", pytrace=False)
        return None
    out = subprocess.run(["ss", "-ltnH", "( sport = :%d )" % port], capture_output=True,
                         text=True, timeout=10).stdout.split()
    return int(out[2])  # State Recv-Q Send-Q ...: Send-Q of a listener is its backlog


@pytest.mark.parametrize("limit,expected", [("0", "somaxconn"), ("10", 10), ("100", 10)])
def test_listen_backlog_is_somaxconn_without_a_limit(procs, tmp_path, keyfile, limit, expected):
    """-n 0 queues as deep as the system allows; behind a limit the queue is C's 10."""
    if expected == "somaxconn":
        with open("/proc/sys/net/core/somaxconn") as f:
            expected = int(f.read())
    source = procs.spiped("-d", tcp_addr(free_port()), keyfile, "-n", limit).addr
    backlog = _listen_backlog(int(source.rsplit(":", 1)[1]))
    if backlog is None:
        pytest.skip("ss (iproute2) not installed")
    assert backlog == expected


def test_backlog_helper_falls_back_without_proc(monkeypatch, tmp_path):
    monkeypatch.setattr(spiped, "SOMAXCONN_FILE", str(tmp_path / "missing"))
    assert spiped.listen_backlog(0) == max(spiped.socket.SOMAXCONN, 10)
    assert spiped.listen_backlog(5) == 10


BURST = 500


@pytest.mark.timeout(120)
def test_a_burst_of_connects_is_all_served(procs, tmp_path, keyfile):
    """500 connects at once to -d -n 0: every one gets the handshake's first bytes.

    The accept loop drains the queue on each wake-up and the queue is
    somaxconn deep, so no SYN of the burst is dropped (a dropped one would
    wait seconds for its retransmission, past the deadline here).
    """
    import resource
    import selectors
    import socket
    import time
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * BURST + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * BURST), hard))
    # A target nobody listens on: each connection sends its nonce, then ends.
    source = procs.spiped("-d", tcp_addr(free_port()), keyfile, "-n", "0").addr
    host, port = source.rsplit(":", 1)
    sockaddr = (host.strip("[]"), int(port))
    sel = selectors.DefaultSelector()
    got = {}
    try:
        for _ in range(BURST):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(sockaddr)
            sel.register(s, selectors.EVENT_READ)
            got[s] = b""
        served = 0
        deadline = time.monotonic() + 20  # SYN retransmissions start at 1 s, then 3 s, 7 s, 15 s
        while served < BURST and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                try:
                    data = s.recv(spiped.NONCE_SIZE - len(got[s]))
                except OSError:
                    data = b""
                got[s] += data
                if len(got[s]) == spiped.NONCE_SIZE or not data:
                    sel.unregister(s)
                    served += len(got[s]) == spiped.NONCE_SIZE
        short = sum(1 for v in got.values() if len(v) < spiped.NONCE_SIZE)
        assert short == 0, "%d of %d connects got no nonce" % (short, BURST)
    finally:
        sel.close()
        for s in got:
            s.close()


class _Chunk(bytearray):
    """A read's buffer that a weak reference can watch."""


def test_relay_lets_go_of_a_read_before_a_write_that_may_block():
    """While WRITE (a slow reader's sendall) blocks, the relay holds only what it
    sends: the buffer of the read it came from is already freed."""
    import weakref
    sealer = spiped.PacketSealer(bytes(32), bytes(32))
    reads = [_Chunk(b"x" * 5000), _Chunk(b"y" * 100)]
    watched = []
    alive_at_write = []

    def read(size):
        if not reads:
            return b""
        chunk = reads.pop(0)
        watched.append(weakref.ref(chunk))
        return chunk

    def write(data):
        alive_at_write.append(watched[-1]() is not None)

    spiped.relay(read, sealer, write)
    assert alive_at_write == [False, False]
