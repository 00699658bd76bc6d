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
import os
import signal
import shutil
import socketserver
import subprocess
import sys

import pytest

import spiped
from conftest import (ROOT, IMPLS, Notify, TargetServer, connect, free_port, key_of, read_text,
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


@pytest.fixture
def holding():
    servers = []

    def make():
        s = HoldingTarget()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def start(procs, cmd, tmp_path, *args, **kw):
    """A foreground daemon running CMD(ARGS); its stderr goes to a file. (proc, source, log)."""
    source = tcp_addr(free_port())
    log = tmp_path / "stderr.log"
    err = open(log, "wb")
    try:
        proc = procs.daemon(cmd("-F", "-s", source, *args), source, stderr=err, **kw)
    finally:
        err.close()
    return proc, source, str(log)


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
    proc, source, log = start(procs, IMPLS["ours"], tmp_path, "-d", "-t", target.addr,
                              "-k", keyfile, "-o", "30", "--drain-timeout", "0.5")
    with connect(source) as s:
        s.settimeout(10)
        assert len(s.recv(32)) == 32  # the daemon's nonce: the handshake is under way
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, read_text(log)
        assert wait_closed(s, 10) is not None
    assert "Traceback" not in read_text(log)


# ---------------------------------------------------------------------------
# 2. -d: a target that refuses ends the handshake at once
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["ours", pytest.param("c", marks=need_c)])
def test_refused_target_drops_the_client_at_once(procs, tmp_path, keyfile, impl):
    """Long before -o: the connect to the target runs beside the handshake."""
    refused = tcp_addr(free_port())  # nothing listens there
    proc, source, log = start(procs, IMPLS[impl], tmp_path, "-d", "-t", refused,
                              "-k", keyfile, "-o", "30")
    with connect(source) as s:
        took = wait_closed(s, 20)  # the client sends nothing at all
    assert took is not None, "client still connected after 20 s"
    assert took < 5, "dropped only after %.1f s" % took
    assert proc.poll() is None


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
    proc, source, log = start(procs, wrapped(tmp_path, COUNT_MODEXP), tmp_path,
                              "-d", "-t", target.addr, "-k", keyfile, "-o", "30",
                              env=dict(os.environ, MODEXP_COUNT=str(count)))
    for _ in range(20):
        with connect(source) as s:
            with pytest.raises(spiped.HandshakeError):
                spiped.handshake(s, key_of(otherkey), client=True, fast=True, deadline=spiped.deadline_in(10))
    with connect(source) as s:
        spiped.handshake(s, key_of(keyfile), client=True, fast=True, deadline=spiped.deadline_in(10))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, read_text(log)
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
    proc, source, log = start(procs, wrapped(tmp_path, SLOW_FULL), tmp_path,
                              "-d", "-t", target.addr, "-k", keyfile,
                              env=dict(os.environ, LOCK_HELD=str(held)))
    before = read_text(held).count("held")
    assert wait_for(lambda: read_text(held).count("held") > before, 10)
    proc.send_signal(signal.SIGTERM)  # lands while slow_full() holds the lock
    assert proc.wait(timeout=10) == 0, read_text(log)


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
        proc, source, log = start(procs, wrapped(tmp_path, SLOW_EVENT), tmp_path,
                                  "-d", "-t", target.addr, "-k", keyfile, "--log-connections",
                                  *drain, env=dict(os.environ, NOTIFY_SOCKET=notify.env))
        clients = []
        for _ in range(4):
            s = connect(source)
            clients.append(s)
            _, opener = spiped.handshake(s, key_of(keyfile), client=True, fast=True, deadline=spiped.deadline_in(10))
            assert opener.open(recv_exact(s, spiped.PACKET)) == b"hello"  # both relays run
        proc.send_signal(signal.SIGTERM)
        notify.wait_for_text("STOPPING=1")  # the drain has begun
        for s in clients:
            s.close()
        assert proc.wait(timeout=20) == 0, read_text(log)
    finally:
        notify.close()
    text = read_text(log)
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
    cmd = wrapped(tmp_path, RAISE_IN % where)
    proc, source, log = start(procs, cmd, tmp_path, "-d", "-t", target.addr, "-k", keyfile,
                              "-o", "30")
    with connect(source) as s:
        sealer, _ = spiped.handshake(s, key_of(keyfile), client=True, fast=True, deadline=spiped.deadline_in(10))
        s.sendall(sealer.seal(b"data for the target"))
        assert wait_closed(s, 10) is not None, "client still connected"
    assert wait_for(lambda: target.eofs == 1, 10), "target still connected"
    text = read_text(log)
    assert "internal error" in text and "ValueError: boom in the relay" in text, text
    # The daemon goes on serving.
    assert proc.poll() is None


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
def test_keepalive_on_both_sockets_unless_j(procs, tmp_path, keyfile, holding, flags):
    target = holding()
    proc, source, log = start(procs, IMPLS["ours"], tmp_path, "-d", "-t", target.addr,
                              "-k", keyfile, *flags)
    sport = source.rsplit(":", 1)[1]
    tport = target.addr.rsplit(":", 1)[1]
    with connect(source) as s:
        spiped.handshake(s, key_of(keyfile), client=True, fast=True, deadline=spiped.deadline_in(10))
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


def _can_unshare_pid():
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True,
                          timeout=10).returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs root and unshare --pid")
def test_pid1_exits_0_on_sigint_with_a_live_connection(procs, tmp_path, keyfile, holding):
    """As PID 1 SIGINT's default action would do nothing; the handler exits 0 at once."""
    target = holding()
    source = tcp_addr(free_port())
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        outer = procs.daemon(["unshare", "--pid", "--fork", sys.executable,
                              os.path.join(ROOT, "spiped.py"), "-F", "-d", "-s", source,
                              "-t", target.addr, "-k", keyfile], source, stderr=err)
    pid1 = _child_pid(outer.pid)
    try:
        with connect(source) as s:
            spiped.handshake(s, key_of(keyfile), client=True, fast=True, deadline=spiped.deadline_in(10))
            assert wait_for(lambda: target.connections == 1, 10)
            os.kill(pid1, signal.SIGINT)
            assert outer.wait(timeout=10) == 0, read_text(log)
    finally:
        if outer.poll() is None:  # unshare passes no signal on: end PID 1 itself
            os.kill(pid1, signal.SIGKILL)
            outer.wait(timeout=10)
    assert "Traceback" not in read_text(log)


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs root and unshare --pid")
def test_pid1_second_sigterm_exits_0_removing_socket_files(procs, tmp_path, keyfile, holding):
    """As PID 1 a second SIGTERM during the drain exits 0 at once, its unix
    source's and --metrics' socket files removed."""
    target = holding()
    source, metrics = str(tmp_path / "source.sock"), str(tmp_path / "metrics.sock")
    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        outer = procs.daemon(["unshare", "--pid", "--fork", sys.executable,
                              os.path.join(ROOT, "spiped.py"), "-F", "-d", "-s", source,
                              "-t", target.addr, "-k", keyfile, "--metrics", metrics],
                             source, stderr=err)
    pid1 = _child_pid(outer.pid)
    try:
        wait_listening(metrics, outer)
        with connect(source) as s:
            spiped.handshake(s, key_of(keyfile), client=True, fast=True, deadline=spiped.deadline_in(10))
            assert wait_for(lambda: target.connections == 1, 10)
            os.kill(pid1, signal.SIGTERM)
            assert wait_for(lambda: not os.path.lexists(source)), "the drain did not begin"
            assert outer.poll() is None
            os.kill(pid1, signal.SIGTERM)
            assert outer.wait(timeout=10) == 0, read_text(log)
    finally:
        if outer.poll() is None:  # unshare passes no signal on: end PID 1 itself
            os.kill(pid1, signal.SIGKILL)
            outer.wait(timeout=10)
    assert not os.path.lexists(metrics)
    assert "Traceback" not in read_text(log)


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
    _, source, _ = start(procs, IMPLS["ours"], tmp_path, "-d", "-t", tcp_addr(free_port()),
                         "-k", keyfile, "-n", limit)
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
    _, source, _ = start(procs, IMPLS["ours"], tmp_path, "-d", "-t", tcp_addr(free_port()),
                         "-k", keyfile, "-n", "0")
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
