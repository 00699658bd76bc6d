"""Running as a service: socket activation, readiness and watchdog, logging,
statistics, the connection limit, drain on SIGTERM, unix-socket hygiene, --help.

Socket activation is done without systemd: the test makes the listening
socket, and a small launcher puts it on fd 3, sets LISTEN_PID to its own PID
and execs spiped.py (exec keeps the PID, so LISTEN_PID matches).
Readiness messages are read from a datagram socket the test binds.
"""
import itertools
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import (HAVE_C, SPIPED_PY, Notify, TargetServer, address_listening, assert_stays,
                      clean_env, connect, exchange, free_port, need_c, ours, pid_gone, quiet,
                      read_text, recv_all, recv_exact, refused, tcp_addr, wait_for,
                      wait_listening)
import spiped

STATS_RE = re.compile(
    r"stats: live=(\d+) total=(\d+) bytes_in=(\d+) bytes_out=(\d+) "
    r"handshake_failures=(\S+) connect_failures=(\d+) limit_reached=(\d+)")
LONG_OPTIONS = ("--syslog", "--log-connections", "--drain-timeout", "--socket-mode", "--help")


# -- helpers ------------------------------------------------------------------


@pytest.fixture
def notify(tmp_path, closing):
    """Makes Notify listeners (at a path, or at an abstract name), closed after the test."""
    paths = (str(tmp_path / ("notify%d" % n)) for n in itertools.count())

    def make(abstract=False):
        if abstract:
            return closing(Notify(abstract="spiped-test-%d-%s" % (os.getpid(),
                                                                  os.urandom(4).hex())))
        return closing(Notify(path=next(paths)))
    return make


def tcp_listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(10)
    return s, tcp_addr(s.getsockname()[1])


def wait_text(path, pred, timeout=10.0):
    """The content of PATH once PRED(content) holds; fails after TIMEOUT."""
    def met():
        text = read_text(path)
        return (text,) if pred(text) else None

    found = wait_for(met, timeout)
    if not found:
        raise AssertionError("condition not met; %s holds:\n%s" % (path, read_text(path)))
    return found[0]


def kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    wait_for(lambda: pid_gone(pid), 5)


def echo_once(addr, payload=b"hello through the pipe"):
    assert exchange(addr, payload, timeout=10) == payload


def front(procs, target, keyfile, impl="ours"):
    """A plaintext entry: -e listening on a fresh port, sealing to TARGET; its address."""
    return procs.spiped("-e", target, keyfile, impl=impl).addr


class ReplyServer(TargetServer):
    """A target that reads to EOF, then sends REPLY bytes and closes."""

    backlog = 16

    def __init__(self, reply):
        self.reply = reply
        self.received = []
        super().__init__()

    def handle(self, c):
        c.settimeout(10)
        self.received.append(len(recv_all(c)))
        c.sendall(self.reply)
        c.shutdown(socket.SHUT_WR)


@pytest.fixture
def reply_server(closing):
    """Makes ReplyServers, closed after the test."""
    return lambda reply: closing(ReplyServer(reply))


def request_stats(proc, err, pred=lambda m: True, timeout=10.0):
    """Send SIGUSR1 until the new stats line satisfies PRED; its match object.

    A connection's slot is freed just after its last log line, so a count
    may need a moment to settle.  Each signal must give exactly one line.
    """
    before = read_text(err).count("stats:")
    sent = 0

    def settled():
        nonlocal sent
        proc.send_signal(signal.SIGUSR1)
        sent += 1
        text = wait_text(err, lambda t: t.count("stats:") >= before + sent)
        assert text.count("stats:") == before + sent, text
        m = list(STATS_RE.finditer(text))[-1]
        return m if pred(m) else None

    m = wait_for(settled, timeout, step=0.05)
    if not m:
        raise AssertionError("stats never settled:\n" + read_text(err))
    return m


def raw_handshake_garbage(addr, key):
    """Client side of a handshake whose DH value has a valid MAC but is >= p."""
    s = connect(addr, timeout=10)
    try:
        nonce_c = os.urandom(spiped.NONCE_SIZE)
        s.sendall(nonce_c)
        nonce_s = recv_exact(s, spiped.NONCE_SIZE)
        dhmac_c, _ = spiped.dhmac_keys(key, nonce_c, nonce_s)
        y = b"\xff" * spiped.DH_SIZE
        s.sendall(y + spiped.hmac_sha256(dhmac_c, y))
        return recv_all(s, reset_ends=True)
    finally:
        s.close()


# -- socket activation --------------------------------------------------------


@pytest.mark.timeout(30)
def test_activation_tcp_ready_status_stopping(procs, notify, keyfile, echo, tmp_path):
    """-F on an inherited TCP socket: data flows, READY, STATUS counts, STOPPING, exit 0."""
    target = echo()
    listener, addr = tcp_listener()
    n = notify()
    try:
        p = procs.activated(ours("-d", "-F", "-s", addr, "-t", target.addr, "-k", keyfile),
                            [listener], env=clean_env(NOTIFY_SOCKET=n.env))
    finally:
        listener.close()  # ours holds its own copy now
    n.wait_for_text("READY=1")
    assert n.statuses()[:1] == [(0, 0)]
    entry = front(procs, addr, keyfile)
    echo_once(entry, os.urandom(5000))
    assert target.connections == 1
    n.wait_for_text("STATUS=0 live, 1 total connections")
    totals = [t for _, t in n.statuses()]
    assert totals == sorted(totals) and totals[-1] == 1
    p.send_signal(signal.SIGTERM)
    n.wait_for_text("STOPPING=1")
    assert p.wait(timeout=10) == 0
    assert p.log_text() == ""


@pytest.mark.timeout(30)
def test_activation_unix_abstract_notify(procs, notify, keyfile, echo, tmp_path):
    """An inherited unix socket, an abstract notify name, a C -e in front when present."""
    target = echo()
    path = str(tmp_path / "act.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(10)
    n = notify(abstract=True)
    try:
        p = procs.activated(ours("-d", "-F", "-s", path, "-t", target.addr, "-k", keyfile),
                            [listener], env=clean_env(NOTIFY_SOCKET=n.env))
    finally:
        listener.close()
    n.wait_for_text("READY=1")
    entry = front(procs, path, keyfile, "c" if HAVE_C else "ours")
    for _ in range(2):
        echo_once(entry, os.urandom(3000))
    n.wait_for_text("STATUS=0 live, 2 total connections")
    p.send_signal(signal.SIGTERM)
    n.wait_for_text("STOPPING=1")
    assert p.wait(timeout=10) == 0
    # The socket file belongs to whoever made it (systemd): ours leaves it.
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


@pytest.mark.timeout(30)
def test_activation_daemonized(procs, notify, keyfile, echo, tmp_path):
    """Without -F: the inherited socket is taken before the fork; the daemon serves it,
    notifies READY/STOPPING, and exits on SIGTERM."""
    target = echo()
    listener, addr = tcp_listener()
    n = notify()
    pidfile = tmp_path / "spiped.pid"
    out = tmp_path / "out"
    daemon_pid = None
    try:
        with open(out, "wb") as f:
            p = procs.activated(ours("-d", "-p", str(pidfile), "-s", addr, "-t", target.addr,
                                     "-k", keyfile),
                                [listener], env=clean_env(NOTIFY_SOCKET=n.env), stdout=f)
            listener.close()
            assert p.wait(timeout=10) == 0, p.log_text()
        daemon_pid = int(pidfile.read_text())
        assert daemon_pid != p.pid and not pid_gone(daemon_pid)
        n.wait_for_text("READY=1")
        entry = front(procs, addr, keyfile)
        echo_once(entry)
        assert target.connections == 1
        os.kill(daemon_pid, signal.SIGTERM)
        n.wait_for_text("STOPPING=1")
        assert wait_for(lambda: pid_gone(daemon_pid), 10)
        assert read_text(out) == "" and p.log_text() == ""
    finally:
        listener.close()
        if daemon_pid is not None:
            kill_pid(daemon_pid)


def _udp_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _unlistened_tcp():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s


class _PipeEnd:
    """The read end of a pipe, shaped like a socket for procs.activated()."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def fileno(self):
        return self.r

    def close(self):
        os.close(self.r)
        os.close(self.w)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make", [_udp_socket, _unlistened_tcp, _PipeEnd],
                         ids=["udp", "tcp-not-listening", "pipe"])
def test_activation_rejects_unusable_descriptor(procs, keyfile, make):
    bad = make()
    try:
        p = procs.activated(ours("-d", "-F", "-s", tcp_addr(free_port()),
                                 "-t", tcp_addr(free_port()), "-k", keyfile), [bad])
        rc = p.wait(timeout=10)
    finally:
        bad.close()
    err = p.log_text()
    assert rc != 0
    assert "descriptor 3" in err, err
    assert err.startswith("spiped: ")


@pytest.mark.timeout(30)
def test_listen_variables_for_another_pid_are_ignored(procs, keyfile, echo):
    """LISTEN_FDS meant for another process: ours binds -s as usual."""
    target = echo()
    p = procs.spiped("-d", target.addr, keyfile, env=clean_env(LISTEN_PID="1", LISTEN_FDS="1"))
    echo_once(front(procs, p.addr, keyfile))
    assert p.poll() is None


@pytest.mark.timeout(30)
def test_activation_drain_leaves_the_socket_to_systemd(procs, notify, keyfile, echo):
    """SIGTERM with a live connection: the passed socket is never shut down.

    systemd keeps its copy, so a client that connects during the drain, or
    after the exit, waits in the backlog for the next start.
    """
    target = echo()
    listener, addr = tcp_listener()  # the test keeps its copy, as systemd does
    n = notify()
    try:
        p = procs.activated(ours("-d", "-F", "-s", addr, "-t", target.addr, "-k", keyfile),
                            [listener], env=clean_env(NOTIFY_SOCKET=n.env))
        n.wait_for_text("READY=1")
        entry = front(procs, addr, keyfile)
        held = connect(entry, timeout=10)
        held.sendall(b"before")
        assert recv_exact(held, 6) == b"before"
        p.send_signal(signal.SIGTERM)
        n.wait_for_text("STOPPING=1")
        during = connect(addr, timeout=5)  # not refused: it queues
        held.sendall(b"during")
        assert recv_exact(held, 6) == b"during"
        held.shutdown(socket.SHUT_WR)
        assert held.recv(64) == b""
        held.close()
        assert p.wait(timeout=10) == 0
        after = connect(addr, timeout=5)
        assert address_listening(addr)
        listener.settimeout(5)
        for _ in (during, after):  # the next start finds both waiting
            listener.accept()[0].close()
        during.close()
        after.close()
    finally:
        listener.close()


SOCKET_ACTIVATE = next((p for p in ("/usr/bin/systemd-socket-activate",
                                    "/lib/systemd/systemd-socket-activate")
                        if os.access(p, os.X_OK)), None)


@pytest.mark.timeout(30)
@pytest.mark.skipif(SOCKET_ACTIVATE is None,
                    reason="systemd-socket-activate not installed (apt-get install systemd)")
def test_systemd_socket_activate(procs, notify, keyfile, echo, tmp_path):
    """The real tool: it listens, execs ours on the first connection."""
    target = echo()
    port = free_port()
    addr = tcp_addr(port)
    n = notify()
    p = procs.daemon([SOCKET_ACTIVATE, "-l", "127.0.0.1:%d" % port,
                      "-E", "NOTIFY_SOCKET=" + n.env,
                      sys.executable, SPIPED_PY, "-d", "-F", "-s", addr,
                      "-t", target.addr, "-k", keyfile], addr, env=clean_env())
    entry = front(procs, addr, keyfile)
    echo_once(entry, os.urandom(4000))
    n.wait_for_text("READY=1")
    n.wait_for_text("STATUS=0 live, 1 total connections")
    p.send_signal(signal.SIGTERM)
    n.wait_for_text("STOPPING=1")
    assert p.wait(timeout=10) == 0
    assert "spiped:" not in p.log_text()


# -- readiness without activation ---------------------------------------------


@pytest.mark.timeout(30)
def test_watchdog_pings(procs, notify, keyfile, echo):
    """WATCHDOG_USEC=400000: pings at least every 0.4 s, for our PID only."""
    target = echo()
    mine, others = notify(), notify()
    src1, src2 = tcp_addr(free_port()), tcp_addr(free_port())
    args = ["-d", "-F", "-t", target.addr, "-k", keyfile]
    # WATCHDOG_PID equal to the PID of ours after exec.
    p1 = procs.activated(ours(*args, "-s", src1), pid_vars=("WATCHDOG_PID",),
                         env=clean_env(NOTIFY_SOCKET=mine.env, WATCHDOG_USEC="400000"))
    # WATCHDOG_PID of another process: the watchdog is not ours to feed.
    p2 = procs.activated(ours(*args, "-s", src2),
                         env=clean_env(NOTIFY_SOCKET=others.env, WATCHDOG_USEC="400000",
                                       WATCHDOG_PID="1"))
    mine.wait_for_text("READY=1")
    others.wait_for_text("READY=1")
    seen = mine.collect(1.5)
    assert seen.count("WATCHDOG=1") >= 3, seen
    others.collect(0.05)
    assert "WATCHDOG=1" not in others.lines
    assert p1.poll() is None and p2.poll() is None


@pytest.mark.timeout(30)
def test_unread_notify_socket_never_blocks_the_daemon(procs, notify, keyfile, echo):
    """A notify socket nobody reads is full (about ten datagrams); the daemon
    drops its messages instead of blocking its accept loop in sendto()."""
    target = echo()
    silent = notify()
    fill(silent)  # full before the daemon's first message, which would block
    proc = procs.spiped("-d", target.addr, keyfile,
                        env=clean_env(NOTIFY_SOCKET=silent.env, WATCHDOG_USEC="20000"))
    src = proc.addr
    with connect(src, timeout=5) as s:
        assert len(recv_exact(s, spiped.NONCE_SIZE)) == spiped.NONCE_SIZE
    silent.collect(0.2)  # drain the queue: pings flow again
    assert silent.collect(0.5).count("WATCHDOG=1") >= 3
    assert proc.poll() is None


def fill(listener):
    """Send datagrams to LISTENER until its queue is full: a new sender's first one would block."""
    for _ in range(100):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(listener.sock.getsockname())
            sent = 0
            try:
                while sent < 10000:
                    s.send(b"FILLER=1")
                    sent += 1
            except BlockingIOError:
                if sent == 0:
                    return
    raise AssertionError("%s never filled up" % listener.env)


# In a process of its own: take every free descriptor, then send.
OUT_OF_DESCRIPTORS = r"""
import errno, os, resource, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import spiped
notifier = spiped.Notifier({"NOTIFY_SOCKET": sys.argv[2]})
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError as e:
    assert e.errno == errno.EMFILE, e
notifier.send("STATUS=out of descriptors")
"""


@pytest.mark.timeout(30)
def test_notify_needs_no_spare_descriptor(notify):
    """Status lines go out from a daemon at its RLIMIT_NOFILE: the notify socket
    is made at start-up, so a message never takes the descriptor that a
    connection being set up at the same moment needs."""
    n = notify()
    subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS, SPIPED_PY, n.env],
                   check=True, timeout=20)
    assert n.wait_for_text("STATUS=out of descriptors", 5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["unset", "missing-path", "missing-abstract"])
def test_no_notify_socket_is_harmless(procs, keyfile, echo, tmp_path, where):
    target = echo()
    env = clean_env(WATCHDOG_USEC="200000")
    if where == "missing-path":
        env["NOTIFY_SOCKET"] = str(tmp_path / "nowhere" / "notify")
    elif where == "missing-abstract":
        env["NOTIFY_SOCKET"] = "@spiped-test-nobody-%s" % os.urandom(4).hex()
    p = procs.spiped("-d", target.addr, keyfile, env=env)
    echo_once(front(procs, p.addr, keyfile))
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    assert p.log_text() == ""


# -- per-connection logging and statistics ------------------------------------


@pytest.mark.timeout(40)
def test_log_connections_each_outcome(procs, keyfile, otherkey, reply_server):
    """--log-connections: accepted, closed with byte counts, and every failure kind."""
    reply = os.urandom(777)
    target = reply_server(reply)
    p = procs.spiped("-d", target.addr, keyfile, "--log-connections", "-o", "1")
    src = p.addr
    good = front(procs, src, keyfile)
    wrong = front(procs, src, otherkey)

    # Handshake timeout: connect, send nothing.  Runs while the others go on.
    idle = connect(src, timeout=10)
    t0 = time.monotonic()
    idle_port = idle.getsockname()[1]
    wait_text(p.log, lambda t: "accepted from [127.0.0.1]:%d" % idle_port in t)

    payload = os.urandom(3000)
    assert exchange(good, payload, timeout=10) == reply
    wait_text(p.log, lambda t: "closed: 3000 bytes in, 777 bytes out" in t)

    assert exchange(wrong, b"x" * 100, timeout=10) == b""
    wait_text(p.log, lambda t: re.search(r"handshake failed: .*MAC", t))

    garbage = connect(src, timeout=10)
    try:
        # The daemon may reset the connection before these calls finish.
        garbage.sendall(os.urandom(spiped.NONCE_SIZE + 2 * 288))
        garbage.shutdown(socket.SHUT_WR)
        while garbage.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError, OSError):
        pass
    garbage.close()
    wait_text(p.log, lambda t: len(re.findall(r"handshake failed: .*MAC", t)) == 2)

    raw_handshake_garbage(src, spiped.read_key(keyfile))
    wait_text(p.log, lambda t: "handshake failed: peer's DH value is not below p" in t)

    # The timed-out one: the server nonce came at once, then the close after ~1 s.
    got = recv_all(idle, reset_ends=True)
    waited = time.monotonic() - t0
    idle.close()
    assert len(got) == spiped.NONCE_SIZE
    assert 0.8 <= waited <= 4, waited
    wait_text(p.log, lambda t: "handshake failed: handshake timed out" in t)

    target.close()
    assert exchange(good, b"y" * 10, timeout=10) == b""
    text = wait_text(p.log, lambda t: re.search(r"connect to .* failed: Connection refused", t))
    assert ("connect to %s failed" % target.addr) in text

    lines = [l for l in text.splitlines() if l]
    assert all(re.match(r"spiped: connection \d+: ", l) for l in lines), lines
    accepted = [l for l in lines if ": accepted from [127.0.0.1]:" in l]
    assert len(accepted) == 6
    numbers = [int(re.match(r"spiped: connection (\d+):", l).group(1)) for l in accepted]
    assert len(set(numbers)) == 6
    assert [r for r in target.received if r] == [3000]

    m = request_stats(p, p.log, lambda m: m.group(1) == "0")
    live, total, b_in, b_out, failures, connect_failures, limit = m.groups()
    failures = dict(kv.split("=") for kv in failures.split(","))
    assert (int(live), int(total), int(b_in), int(b_out)) == (0, 6, 3000, 777)
    assert {k: int(v) for k, v in failures.items() if int(v)} == \
        {"bad-mac": 2, "garbage": 1, "timeout": 1}
    assert (int(connect_failures), int(limit)) == (1, 0)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0


@pytest.mark.timeout(40)
def test_sigusr1_stats_counts(procs, keyfile, otherkey, echo):
    """Without --log-connections: SIGUSR1 gives one stats line and nothing else is logged."""
    target = echo()
    p = procs.spiped("-d", target.addr, keyfile)
    src = p.addr
    good = front(procs, src, keyfile)
    wrong = front(procs, src, otherkey)
    sent = 0
    for size in (1, 1024 * 5 + 7, 40000):
        data = os.urandom(size)
        assert exchange(good, data, timeout=10) == data
        sent += size
    for _ in range(2):
        assert exchange(wrong, b"secret", timeout=10) == b""
    # Hold one connection open, then a refused target.
    held = connect(good, timeout=10)
    held.sendall(b"abc")
    assert held.recv(10) == b"abc"
    target.close()
    assert exchange(good, b"nowhere", timeout=10) == b""
    assert p.log_text() == ""
    m = request_stats(p, p.log, lambda m: m.group(1) == "1")
    text = p.log_text()
    assert all(line.startswith("spiped: stats: ") for line in text.splitlines()), text
    live, total, b_in, b_out, failures, connect_failures, limit = m.groups()
    failures = dict(kv.split("=") for kv in failures.split(","))
    assert set(failures) == {"timeout", "bad-mac", "no-pfs", "closed", "garbage", "io"}
    assert {k: int(v) for k, v in failures.items() if int(v)} == {"bad-mac": 2}
    # The held connection is live and its 3 bytes each way are counted.
    assert (int(live), int(total)) == (1, 7)
    assert (int(b_in), int(b_out)) == (sent + 3, sent + 3)
    assert (int(connect_failures), int(limit)) == (1, 0)
    held.close()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0


@pytest.mark.timeout(40)
@pytest.mark.parametrize("impl", ["ours", pytest.param("c", marks=need_c)])
def test_connection_limit_warning_each_time(procs, keyfile, echo, impl):
    """-n 1: warned at each accept that reaches the limit; the next client waits."""
    target = echo()
    warning = "spiped: Maximum number of connections (1) reached"
    p = procs.spiped("-d", target.addr, keyfile, "-n", "1", "-o", "10", impl=impl)
    src = p.addr
    first = connect(src, timeout=10)
    assert len(recv_exact(first, spiped.NONCE_SIZE)) == spiped.NONCE_SIZE  # accepted: the server nonce comes
    wait_text(p.log, lambda t: t.count(warning) == 1)
    second = connect(src, timeout=10)
    assert_stays(lambda: quiet(second), 0.5, what="the second client was accepted at once")
    if impl == "ours":
        p.send_signal(signal.SIGUSR1)
        m = STATS_RE.search(wait_text(p.log, lambda t: "stats:" in t))
        assert (m.group(1), m.group(2), m.group(7)) == ("1", "1", "1")
    first.close()
    assert len(recv_exact(second, spiped.NONCE_SIZE)) == spiped.NONCE_SIZE
    text = wait_text(p.log, lambda t: t.count(warning) == 2)
    assert text.count(warning) == 2
    if impl == "ours":
        p.send_signal(signal.SIGUSR1)
        text = wait_text(p.log, lambda t: t.count("stats:") == 2)
        m = list(STATS_RE.finditer(text))[-1]
        assert (m.group(1), m.group(2), m.group(7)) == ("1", "2", "2")
    second.close()


# -- shutdown -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_drain_timeout_cuts_held_connection(procs, keyfile, echo):
    target = echo()
    p = procs.spiped("-d", target.addr, keyfile, "--drain-timeout", "1")
    entry = front(procs, p.addr, keyfile)
    held = connect(entry, timeout=10)
    held.sendall(b"before")
    assert held.recv(64) == b"before"
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    # While draining, the connection is still served.
    held.sendall(b"during")
    assert held.recv(64) == b"during"
    try:
        assert held.recv(64) == b""
    except ConnectionResetError:
        pass
    cut = time.monotonic() - t0
    assert p.wait(timeout=5) == 0
    exited = time.monotonic() - t0
    held.close()
    assert 0.8 <= cut <= 2.0, cut
    assert exited <= 2.0, exited
    assert p.log_text() == ""


@pytest.mark.timeout(30)
def test_sigterm_without_drain_timeout_waits(procs, keyfile, echo):
    target = echo()
    p = procs.spiped("-d", target.addr, keyfile)
    entry = front(procs, p.addr, keyfile)
    held = connect(entry, timeout=10)
    held.sendall(b"before")
    assert held.recv(64) == b"before"
    p.send_signal(signal.SIGTERM)
    assert_stays(lambda: p.poll() is None, 2, what="exited with a live connection")
    held.sendall(b"still here")
    assert held.recv(64) == b"still here"
    held.shutdown(socket.SHUT_WR)
    assert held.recv(64) == b""
    held.close()
    assert p.wait(timeout=5) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_drain_refuses_new_clients_at_once(procs, keyfile, echo, tmp_path, kind):
    """SIGTERM: a new client is refused at once (a unix source's file is gone)
    while a live connection keeps flowing to its end."""
    target = echo()
    src = tcp_addr(free_port()) if kind == "tcp" else str(tmp_path / "drain.sock")
    p = procs.spiped("-d", target.addr, keyfile, source=src)
    entry = front(procs, src, keyfile)
    held = connect(entry, timeout=10)
    held.sendall(b"before")
    assert recv_exact(held, 6) == b"before"
    p.send_signal(signal.SIGTERM)
    assert wait_for(lambda: refused(src), step=0.1), "a new client still connects while draining"
    # The file goes (and TCP refuses) as the drain begins; the serve thread
    # closes its descriptor, which leaves the kernel's table, a moment later.
    assert wait_for(lambda: not address_listening(src), step=0.05)
    if kind == "unix":
        assert not os.path.lexists(src)
    for i in range(3):
        held.sendall(b"during %d" % i)
        assert recv_exact(held, 8) == b"during %d" % i
    assert p.poll() is None
    held.shutdown(socket.SHUT_WR)
    assert held.recv(64) == b""
    held.close()
    assert p.wait(timeout=10) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("foreground", [True, False], ids=["F", "daemon"])
def test_second_sigterm_exits_at_once_removing_socket_files(procs, keyfile, echo, tmp_path,
                                                            foreground):
    """During a drain a second SIGTERM ends the process at once (killed by it,
    as C is); the unix source's and --metrics' socket files go, the pidfile stays."""
    target = echo()
    src, metrics = str(tmp_path / "source.sock"), str(tmp_path / "metrics.sock")
    pidfile = tmp_path / "spiped.pid"
    args = ["-d", "-s", src, "-t", target.addr, "-k", keyfile, "--metrics", metrics]
    pid = None
    try:
        if foreground:
            p = procs.daemon(ours("-F", *args), src)
            pid = p.pid
        else:  # what is tested includes the start: daemonizing
            p = procs.start(ours("-p", str(pidfile), *args))
            assert p.wait(timeout=30) == 0, p.stderr.read()
            pid = int(pidfile.read_text())
        wait_listening(metrics)
        held = connect(front(procs, src, keyfile), timeout=10)
        held.sendall(b"held")
        assert recv_exact(held, 4) == b"held"
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not os.path.lexists(src)), "the drain did not begin"
        os.kill(pid, signal.SIGTERM)
        if foreground:
            assert p.wait(timeout=5) == -signal.SIGTERM
        else:
            assert wait_for(lambda: pid_gone(pid), 5)
            assert pidfile.read_text() == str(pid)  # left, as C leaves it
        assert not os.path.lexists(metrics)
        held.close()
    finally:
        if pid is not None and not foreground:
            kill_pid(pid)


# -- unix socket hygiene ------------------------------------------------------


@pytest.mark.timeout(30)
def test_stale_unix_socket_is_replaced_and_removed_at_exit(procs, keyfile, echo, tmp_path):
    target = echo()
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.listen(1)
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    p = procs.spiped("-d", target.addr, keyfile, source=path)
    echo_once(front(procs, path, keyfile))
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    assert not os.path.lexists(path)
    assert "stale" in p.log_text()


@pytest.mark.timeout(30)
def test_live_unix_socket_is_left_alone(procs, keyfile, echo, tmp_path):
    path = str(tmp_path / "live.sock")
    other = echo(path)
    before = os.lstat(path)
    p = procs.start(ours("-d", "-F", "-s", path, "-t", tcp_addr(free_port()), "-k", keyfile))
    assert p.wait(timeout=10) == 1
    err = p.stderr.read().decode()
    assert path in err and "in use" in err, err
    after = os.lstat(path)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert exchange(path, b"other listener", timeout=10) == b"other listener"
    assert wait_for(lambda: b"other listener" in other.received, 5)


@pytest.mark.timeout(30)
def test_regular_file_at_socket_path_is_left_alone(procs, keyfile, tmp_path):
    path = tmp_path / "file.sock"
    content = b"not a socket\n" + os.urandom(64)
    path.write_bytes(content)
    p = procs.start(ours("-d", "-F", "-s", str(path), "-t", tcp_addr(free_port()),
                         "-k", keyfile))
    assert p.wait(timeout=10) == 1
    err = p.stderr.read().decode()
    assert str(path) in err and "not a socket" in err, err
    assert path.read_bytes() == content


# Run spiped.py (argv[1:]) with os.chmod replaced by a function that fails
# loudly: --socket-mode must not chmod the path after bind().
NO_CHMOD = r"""
import os, runpy, sys
def chmod(path, *args, **kw):
    sys.stderr.write("chmod(%r) called\n" % (path,))
    sys.stderr.flush()
    os._exit(97)
os.chmod = chmod
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def proc_umask(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    pytest.skip("this kernel does not show Umask in /proc/PID/status")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666, 0o700, 0o777])
def test_socket_mode(procs, keyfile, echo, tmp_path, mode):
    """The socket is created with the mode (set by umask around bind(), no
    chmod of the path afterwards) and the process umask is restored."""
    target = echo()
    path = str(tmp_path / "mode.sock")
    old = os.umask(0o022)
    try:
        p = procs.spiped("-d", target.addr, keyfile, "--socket-mode", "%o" % mode, source=path,
                         impl=lambda *args: [sys.executable, "-c", NO_CHMOD, SPIPED_PY, *args])
    finally:
        os.umask(old)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode
    assert proc_umask(p.pid) == 0o022
    echo_once(front(procs, path, keyfile))
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0, p.log_text()
    assert not os.path.lexists(path)


# -- syslog -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_syslog_foreground_log_connections(procs, keyfile, echo, devlog):
    """--syslog -F --log-connections: connection lines go to syslog, not stderr."""
    target = echo()
    p = procs.spiped("-d", target.addr, keyfile, "--syslog", "--log-connections")
    echo_once(front(procs, p.addr, keyfile), b"z" * 123)
    if devlog is not None:
        devlog.wait_for_text("closed:")  # the slot is free once this is logged
        p.send_signal(signal.SIGUSR1)
        devlog.wait_for_text("stats:")
        got = devlog.messages
        tag = re.compile(r"^<\d+>.* spiped(\[%d\])?: " % p.pid)

        def logged(text):
            return any(tag.match(g) and text in g for g in got)

        assert logged("connection 1: accepted from [127.0.0.1]:"), got
        assert logged("connection 1: closed: 123 bytes in, 123 bytes out"), got
        assert logged("stats: live=0 total=1 "), got
    else:
        p.send_signal(signal.SIGUSR1)
        # Nothing to wait on: syslog is not ours to read here.  What is
        # tested is that nothing reaches stderr within this second.
        assert_stays(lambda: "connection" not in p.log_text() and "stats:" not in p.log_text(),
                     1, what=p.log_text)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    assert "connection" not in p.log_text() and "stats:" not in p.log_text()


# -- --help -------------------------------------------------------------------


def test_help_lists_long_options():
    r = subprocess.run(ours("--help"), stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=30)
    assert r.returncode == 0
    out = r.stdout.decode()
    assert out.startswith("usage: spiped {-e | -d}")
    starts = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    for option in LONG_OPTIONS:
        assert option in starts, (option, out)
    assert r.stderr == b""
