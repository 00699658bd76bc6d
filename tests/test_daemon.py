"""Process behaviour, C and ours side by side: daemonizing, pidfiles,
start-up errors seen by the parent, -D, signals, --syslog, -b, -k -, -v
and -u in a daemon.

A daemonized spiped keeps the parent's stdout and stderr, so both go to
files here.  Every daemon is killed in teardown by the PID its pidfile
names (checked against its command line first, so a recycled PID is
never hit); a daemon that wrote no pidfile is found by the scratch
directory on its command line.
"""
import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import (
    C_SPIPE,
    C_SPIPED,
    IMPLS,
    SPIPED_PY,
    address_listening,
    assert_stays,
    c_spiped,
    connect,
    echoed,
    exchange,
    free_port,
    have_ipv6,
    need_c,
    pid_gone,
    proc_ids,
    read_text,
    tcp_addr,
    wait_for,
)
import spiped

pytestmark = need_c

IMPL_IDS = ["c", "ours"]
RUN_TIMEOUT = 10
NONCE = 32  # what a -d daemon sends first on every accepted connection


# -- helpers ----------------------------------------------------------------


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pidfile(path):
    with open(path, "rb") as f:
        return f.read()


class Daemons:
    """Daemons started by one test; each killed by PID and awaited in teardown."""

    def __init__(self, scratch):
        self.marker = str(scratch)
        self.pidfiles = []

    def run(self, cmd, cwd, pidfile, stdin=subprocess.DEVNULL, input=None):
        """Run the parent of a daemon with output to files; return (parent pid, status, out, err paths)."""
        self.pidfiles.append(str(pidfile))
        n = len(self.pidfiles)
        out = os.path.join(self.marker, "stdout.%d" % n)
        err = os.path.join(self.marker, "stderr.%d" % n)
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen(cmd, cwd=str(cwd), stdin=stdin, stdout=fo, stderr=fe)
            try:
                if input is not None:
                    p.stdin.write(input)
                    p.stdin.close()
                status = p.wait(timeout=RUN_TIMEOUT)
            except BaseException:
                p.kill()
                p.wait()
                raise
        return p.pid, status, out, err

    def _ours(self, pid):
        cmd = _cmdline(pid)
        return self.marker in cmd and (SPIPED_PY in cmd or C_SPIPED in cmd)

    def close(self):
        """Kill every daemon of the test (SIGKILL) and wait until each is gone."""
        pids = set()
        for path in self.pidfiles:
            try:
                text = read_pidfile(path).decode().strip()
            except (OSError, UnicodeDecodeError):
                continue
            if text.isdigit():
                pids.add(int(text))
        # Daemons that never wrote a pidfile still carry the scratch path.
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                pids.add(int(name))
        pids = [pid for pid in pids if self._ours(pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:
            wait_for(lambda: pid_gone(pid), 5)


@pytest.fixture
def daemons(tmp_path, closing):
    return closing(Daemons(tmp_path))


@pytest.fixture
def cwd(tmp_path):
    path = tmp_path / "cwd"
    path.mkdir()
    return path


def base_cmd(impl, *args):
    return IMPLS[impl](*args)


def receive_nonce(addr):
    """Connect to a -d listener (no polling) and read the nonce it sends at once."""
    with connect(addr, timeout=5) as s:
        got = b""
        while len(got) < NONCE:
            chunk = s.recv(NONCE - len(got))
            if not chunk:
                break
            got += chunk
    return got


# -- daemonizing -------------------------------------------------------------


def check_daemon(parent, pidfile):
    """The pidfile holds a live daemon's PID, no newline, not the parent's; the PID."""
    raw = read_pidfile(pidfile)
    assert re.fullmatch(rb"[0-9]+", raw), "pidfile content %r" % raw
    pid = int(raw)
    assert pid != parent
    assert not pid_gone(pid)
    assert SPIPED_PY in _cmdline(pid) or C_SPIPED in _cmdline(pid)
    return pid


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_daemon_tcp_listens_when_parent_returns(impl, daemons, cwd, keyfile, echo):
    target = echo()
    port = free_port()
    source = tcp_addr(port)
    pidfile = cwd / ("%s.pid" % source)
    parent, status, out, err = daemons.run(
        base_cmd(impl, "-d", "-s", source, "-t", target.addr, "-k", keyfile), cwd, pidfile)
    # No polling: the socket must accept the moment the parent is gone.
    nonce = receive_nonce(source)
    assert status == 0, read_text(err)
    assert len(nonce) == NONCE
    assert os.listdir(cwd) == [pidfile.name]
    pid = check_daemon(parent, pidfile)
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[3]) == pid, "daemon did not call setsid()"  # session id
    assert read_text(out) == "" and read_text(err) == ""
    # The target saw the connection made for the nonce (-d connects at accept).
    assert wait_for(lambda: target.connections == 1, 5)


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_daemon_unix_source_pidfile(impl, daemons, cwd, tmp_path, keyfile, echo):
    target = echo()
    source = str(tmp_path / "x.sock")
    pidfile = tmp_path / "x.sock.pid"
    parent, status, out, err = daemons.run(
        base_cmd(impl, "-d", "-s", source, "-t", target.addr, "-k", keyfile), cwd, pidfile)
    nonce = receive_nonce(source)
    assert status == 0, read_text(err)
    assert len(nonce) == NONCE
    check_daemon(parent, pidfile)
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_daemon_pidfile_option(impl, daemons, cwd, tmp_path, keyfile, echo):
    target = echo()
    source = tcp_addr(free_port())
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    pidfile = elsewhere / "spiped.pid"
    pidfile.write_text("stale contents longer than any pid\n")  # overwritten, not appended
    parent, status, out, err = daemons.run(
        base_cmd(impl, "-d", "-s", source, "-t", target.addr, "-k", keyfile, "-p", str(pidfile)),
        cwd, pidfile)
    nonce = receive_nonce(source)
    assert status == 0, read_text(err)
    assert len(nonce) == NONCE
    check_daemon(parent, pidfile)
    assert os.listdir(cwd) == [], "default pidfile written despite -p"


# -- errors the parent reports ----------------------------------------------


def _startup_failure(impl, daemons, cwd, args):
    pidfile = cwd / "daemon.pid"
    start = time.monotonic()
    _, status, out, err = daemons.run(base_cmd(impl, *args, "-p", str(pidfile)), cwd, pidfile)
    return {
        "status": status,
        "elapsed": time.monotonic() - start,
        "stdout": read_text(out),
        "stderr": read_text(err),
        "pidfile": pidfile.exists(),
    }


@pytest.mark.parametrize("case", ["address-in-use", "missing-key", "unresolvable-target"])
def test_daemon_startup_errors_reach_parent(case, daemons, cwd, tmp_path, keyfile):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        source = tcp_addr(busy.getsockname()[1]) if case == "address-in-use" \
            else tcp_addr(free_port())
        target = "nonexistent.invalid:80" if case == "unresolvable-target" \
            else tcp_addr(free_port())
        key = str(tmp_path / "no-such-key") if case == "missing-key" else keyfile
        expected = {
            "address-in-use": "spiped: Error binding socket: Address already in use\n",
            "missing-key": "spiped: Cannot open file: %s: No such file or directory\n"
                           "spiped: Error reading shared secret\n" % key,
            "unresolvable-target": "spiped: Error looking up nonexistent.invalid: ",
        }[case]
        args = ("-e", "-s", source, "-t", target, "-k", key)
        results = {impl: _startup_failure(impl, daemons, cwd, args) for impl in IMPL_IDS}
    finally:
        busy.close()
    for impl, r in results.items():
        assert r["status"] == 1, (impl, r)
        assert r["stdout"] == "", (impl, r)
        assert r["stderr"].startswith(expected), (impl, r)
        assert not r["pidfile"], (impl, "pidfile written although start-up failed")
        assert r["elapsed"] < 5, (impl, r)
    assert results["ours"]["stderr"] == results["c"]["stderr"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("impl", IMPL_IDS)
def test_D_daemonizes_before_resolving(impl, daemons, cwd, keyfile):
    source = tcp_addr(free_port())
    pidfile = cwd / "d.pid"
    start = time.monotonic()
    parent, status, out, err = daemons.run(
        base_cmd(impl, "-D", "-e", "-s", source, "-t", "nonexistent.invalid:80",
                 "-k", keyfile, "-p", str(pidfile)), cwd, pidfile)
    assert status == 0, read_text(err)
    assert time.monotonic() - start < 2
    pid = check_daemon(parent, pidfile)
    pattern = "spiped: Error looking up nonexistent.invalid"

    def two_lines():
        return read_text(err).count(pattern) >= 2

    assert wait_for(two_lines, 3.5, step=0.1), read_text(err)
    lines = read_text(err).splitlines()
    assert all(line.startswith(pattern) for line in lines), lines
    assert not pid_gone(pid)
    assert not address_listening(source)


# -- signals -----------------------------------------------------------------


@pytest.fixture
def relay(procs, keyfile, echo):
    """Factory: IMPL in -e (foreground) -> C spiped -d -> echo; returns (-e, its source)."""
    def make(impl):
        e, _ = procs.chain(echo().addr, keyfile, impl, "c")
        return e, e.addr
    return make


def not_served(addr):
    """True unless a new connection to ADDR gets its data echoed within 1 s."""
    try:
        s = connect(addr, timeout=1.0)
    except OSError:
        return True  # refused: not served either
    with s:
        try:
            s.sendall(b"new")
            return s.recv(16) == b""
        except socket.timeout:
            return True
        except OSError:
            return True


# C polls its SIGTERM flag once a second: a daemon has noticed the signal
# once it no longer serves new connections.
C_SIGNAL_POLL = 1.2


def wait_draining(source):
    """Wait until the daemon on SOURCE stops serving new connections (it saw SIGTERM)."""
    return wait_for(lambda: not_served(source), 4 * C_SIGNAL_POLL, step=0)


@contextlib.contextmanager
def draining(proc, source, first):
    """A connection to SOURCE that carried FIRST, held while PROC's drain
    after a SIGTERM has begun; yields it."""
    with connect(source, timeout=5) as live:
        assert echoed(live, first) == first
        proc.send_signal(signal.SIGTERM)
        assert wait_draining(source), "still serving new connections after SIGTERM"
        yield live


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_sigterm_drains_live_connection(impl, relay):
    proc, source = relay(impl)
    with draining(proc, source, b"before") as live:
        assert proc.poll() is None, "exited with a live connection"
        assert echoed(live, b"after the signal") == b"after the signal"
        assert not_served(source)
        assert proc.poll() is None
        live.shutdown(socket.SHUT_WR)
        live.settimeout(5)
        assert live.recv(16) == b""
    assert proc.wait(timeout=3) == 0


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_sigterm_idle_exits_zero(impl, relay):
    proc, _ = relay(impl)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=2) == 0


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_second_sigterm_kills(impl, relay):
    proc, source = relay(impl)
    with draining(proc, source, b"x"):
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=2) == -signal.SIGTERM


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_sigint_kills_by_signal(impl, relay):
    proc, source = relay(impl)
    with connect(source, timeout=5) as live:
        assert echoed(live, b"x") == b"x"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=2) == -signal.SIGINT


# -- syslog ------------------------------------------------------------------


LIMIT_WARNING = "Maximum number of connections (1) reached"


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_syslog_after_daemonizing(impl, daemons, cwd, keyfile, echo, devlog):
    target = echo()
    source = tcp_addr(free_port())
    pidfile = cwd / "d.pid"
    _, status, out, err = daemons.run(
        base_cmd(impl, "-d", "--syslog", "-n", "1", "-s", source, "-t", target.addr,
                 "-k", keyfile, "-p", str(pidfile)), cwd, pidfile)
    assert status == 0, read_text(err)
    with connect(source, timeout=5) as s:
        assert len(s.recv(NONCE)) > 0  # accepted: the limit is reached now
        if devlog is not None:
            devlog.wait_for_text(LIMIT_WARNING, 3)
        else:
            # The warning goes to a syslog we cannot read; what is tested is
            # that nothing reaches stderr meanwhile, so watch it half a second.
            assert_stays(lambda: read_text(err) == "", 0.5, what=lambda: read_text(err))
    assert read_text(err) == ""
    assert read_text(out) == ""


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_syslog_with_F_keeps_stderr(impl, procs, keyfile, echo, devlog):
    target = echo()
    d = procs.spiped("-d", target.addr, keyfile, "--syslog", "-n", "1", impl=impl)
    with connect(d.addr, timeout=5) as s:
        assert len(s.recv(NONCE)) > 0
        assert wait_for(lambda: LIMIT_WARNING in d.log_text(), 3, step=0.05)
        if devlog is not None:
            got = devlog.collect(0.3)
            assert not any(LIMIT_WARNING in m for m in got), got
    assert d.log_text() == "spiped: %s\n" % LIMIT_WARNING


# -- -b, -k -, -v ------------------------------------------------------------


def test_bind_address_ours(procs, keyfile, echo):
    target = echo()
    source = procs.spiped("-d", target.addr, keyfile, "-b", "127.0.0.2").addr
    r = subprocess.run([C_SPIPE, "-t", source, "-k", keyfile], input=b"from 127.0.0.2",
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"from 127.0.0.2", b"")
    assert [peer[0] for peer in target.peers] == ["127.0.0.2"]


@pytest.mark.skipif(not have_ipv6(), reason="no IPv6 on loopback")
def test_bind_address_bare_ipv6_with_port(procs, keyfile, echo):
    """-b ::1:PORT is the host ::1 and the port PORT (split at the last ':')."""
    target = echo("[::1]:0")
    port = free_port("::1")
    source = procs.spiped("-d", target.addr, keyfile, "-b", "::1:%d" % port).addr
    r = subprocess.run([C_SPIPE, "-t", source, "-k", keyfile], input=b"from ::1",
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"from ::1", b"")
    assert [peer[:2] for peer in target.peers] == [("::1", port)]


def test_bind_address_rejected_by_c_162(keyfile):
    r = subprocess.run(c_spiped("-e", "-F", "-b", "127.0.0.2", "-s", tcp_addr(free_port()),
                                "-t", tcp_addr(free_port()), "-k", keyfile),
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 1
    assert r.stderr.startswith(b"spiped: illegal option -- -b\nusage: spiped")


def test_key_from_stdin(procs, tmp_path, echo):
    # A trailing newline is part of the key: nothing may strip it.
    key = os.urandom(40) + b"\n"
    keyfile = tmp_path / "stdin-key"
    keyfile.write_bytes(key)
    os.chmod(keyfile, 0o600)
    target = echo()
    source = procs.spiped("-d", target.addr, "-", input=key).addr
    middle = procs.spiped("-e", source, str(keyfile), impl="c").addr
    payload = os.urandom(5000)
    assert exchange(middle, payload, timeout=10) == payload
    # And the same key with its newline dropped is a different key.
    short = tmp_path / "short-key"
    short.write_bytes(key[:-1])
    os.chmod(short, 0o600)
    r = subprocess.run([C_SPIPE, "-t", source, "-k", str(short)], input=b"no",
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert r.returncode != 0 and r.stdout == b""


@pytest.mark.parametrize("impl", IMPL_IDS)
def test_version(impl):
    r = subprocess.run(base_cmd(impl, "-v"), capture_output=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 0
    assert r.stdout == b""
    version = "1.6.2" if impl == "c" else spiped.__version__
    assert r.stderr.decode() == "spiped %s\n" % version


# -- -u in a daemon ----------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="-u needs root")
def test_daemon_drops_to_nobody(daemons, cwd, keyfile, echo):
    nobody = pwd.getpwnam("nobody")
    seen = {}
    for impl in IMPL_IDS:
        target = echo()
        source = tcp_addr(free_port())
        pidfile = cwd / ("%s.pid" % source)
        parent, status, out, err = daemons.run(
            base_cmd(impl, "-d", "-u", "nobody", "-s", source, "-t", target.addr,
                     "-k", keyfile), cwd, pidfile)
        nonce = receive_nonce(source)
        assert status == 0, (impl, read_text(err))
        assert len(nonce) == NONCE, impl
        pid = check_daemon(parent, pidfile)
        seen[impl] = uids, gids, groups = proc_ids(pid)
        assert uids == [nobody.pw_uid] * 4, (impl, seen[impl])
        # A user alone keeps the group the daemon started with (as C
        # does); supplementary groups are cleared.
        assert gids == [os.getgid()] * 4, (impl, seen[impl])
        assert groups == [], (impl, seen[impl])
        assert read_text(err) == "", impl
    assert seen["ours"] == seen["c"]
