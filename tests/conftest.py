"""Shared fixtures: key files, ports, an echo target, and daemons (ours or C).

Every process started here is killed by PID in teardown and waited for.
Daemons are started with -F; readiness is read from /proc/net (no probe
connection is made, so connection counts stay exact).
"""
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPIPED_PY = os.path.join(ROOT, "spiped.py")
VECTORS = os.path.join(ROOT, "tests", "vectors")
C_SPIPED = shutil.which("spiped", path="/usr/bin:/usr/local/bin") or "/usr/bin/spiped"
C_SPIPE = shutil.which("spipe", path="/usr/bin:/usr/local/bin") or "/usr/bin/spipe"
sys.path.insert(0, ROOT)

HAVE_C = os.access("/usr/bin/spiped", os.X_OK)
need_c = pytest.mark.skipif(not HAVE_C, reason="C spiped not installed (apt-get install spiped)")

# For tests that run a program as an unprivileged user: the interpreter
# itself, not a venv's link to it, since the checkout and its .venv may sit
# where that user cannot read (/root is 0700).  Such tests also run copies of
# spiped.py or keygen.py placed in a folder the user can read.
REAL_PYTHON = os.path.realpath(sys.executable)


def ours(*args):
    """Command line that runs our spiped.py with ARGS."""
    return [sys.executable, SPIPED_PY, *args]


def ours_spipe(*args):
    return [sys.executable, SPIPED_PY, "spipe", *args]


def c_spiped(*args):
    return [C_SPIPED, *args]


IMPLS = {"ours": ours, "c": c_spiped}


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago on HOST."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def have_ipv6():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _listening_tcp_ports():
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def _listening_unix_paths():
    paths = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Flags 00010000 = __SO_ACCEPTCON; state 01 = unconnected listener.
            if len(parts) >= 8 and parts[3] == "00010000":
                paths.add(parts[7])
    return paths


def address_listening(addr):
    """True when something listens on spiped-style address ADDR."""
    if addr.startswith("/"):
        return addr in _listening_unix_paths()
    port = int(addr.rsplit(":", 1)[1])
    return port in _listening_tcp_ports()


def wait_for(predicate, timeout=10.0, step=0.02):
    """Poll PREDICATE until it returns a true value or TIMEOUT seconds passed.

    Returns its last value: true once the condition held, false on timeout.
    Tests wait with this, never with a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def read_text(path):
    """The file at PATH as text (bad UTF-8 replaced); "" while it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def key_of(path):
    """The key spiped makes of the key file at PATH: SHA256 of its bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


WRAPPER = """\
import os, sys, time
sys.path.insert(0, %r)
import spiped
%s
sys.exit(spiped.main(["spiped"] + sys.argv[1:]))
"""


def wrapped(tmp_path, patch):
    """Command line running spiped's main() after PATCH (Python source) changed the module."""
    script = tmp_path / "wrapped_spiped.py"
    script.write_text(WRAPPER % (ROOT, patch))
    return lambda *args: [sys.executable, str(script), *args]


def wait_closed(sock, timeout):
    """Read SOCK until EOF or reset; seconds it took, or None if it stayed open."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        return None
    return time.monotonic() - started


def recv_exact(sock, size):
    """Exactly SIZE bytes from SOCK; EOFError if the peer closes first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise EOFError("peer closed after %d of %d bytes" % (len(buf), size))
        buf += chunk
    return bytes(buf)


def drain(sock, limit=1 << 22):
    """Read until EOF; (bytes, 'eof' | 'reset' | 'timeout' | 'too much')."""
    got = bytearray()
    try:
        while len(got) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(got), "eof"
            got += chunk
        return bytes(got), "too much"
    except socket.timeout:
        return bytes(got), "timeout"
    except OSError:
        return bytes(got), "reset"


def wait_listening(addr, proc=None, timeout=10.0):
    """Wait until something listens on ADDR; RuntimeError if PROC exits first."""
    def ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening on %s"
                               % (proc.returncode, addr))
        return address_listening(addr)
    if not wait_for(ready, timeout, step=0.01):
        raise RuntimeError("nothing listening on %s after %.1fs" % (addr, timeout))


def connect(addr, timeout=10.0):
    """A connected socket to spiped-style address ADDR."""
    if addr.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(addr)
        return s
    host, port = addr.rsplit(":", 1)
    host = host.strip("[]")
    s = socket.create_connection((host, int(port)), timeout=timeout)
    return s


def refused(addr):
    """True when a connect to ADDR is refused at once (a unix path: also when it is gone).

    A reset counts too: a connect that reached the backlog as the listener
    closed is reset by the kernel, before or after connect() returns.
    """
    try:
        connect(addr, timeout=5).close()
    except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError):
        return True
    return False


class SecretFolder:
    """A folder as the kubelet mounts a Secret: NAME -> ..data/NAME, ..data -> ..vN.

    publish() writes a new version folder and swaps ..data to it in one
    rename, as the kubelet does; its files get MODE and, if given, GID.
    """

    def __init__(self, root, *names, mode=0o600, gid=None):
        self.root, self.names, self.mode, self.gid = str(root), names, mode, gid
        self.versions = 0
        os.makedirs(self.root, exist_ok=True)
        for name in names:
            os.symlink(os.path.join("..data", name), self.path(name))

    def path(self, name):
        return os.path.join(self.root, name)

    def publish(self, **files):
        """FILES (name=bytes) become the Secret's content at once; the old version is removed."""
        self.versions += 1
        folder = os.path.join(self.root, "..v%d" % self.versions)
        os.mkdir(folder, 0o755)
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(folder, name), self.mode)
            if self.gid is not None:
                os.chown(os.path.join(folder, name), -1, self.gid)
        link = os.path.join(self.root, "..data_tmp")
        os.symlink(os.path.basename(folder), link)
        os.rename(link, os.path.join(self.root, "..data"))
        if self.versions > 1:
            shutil.rmtree(os.path.join(self.root, "..v%d" % (self.versions - 1)))


def tcp_addr(port, host="127.0.0.1"):
    return "[%s]:%d" % (host, port)


class Procs:
    """Processes started by one test; all killed by PID and reaped at the end."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def daemon(self, cmd, source, **kw):
        """Start a foreground daemon and wait until SOURCE is listening."""
        p = self.start(cmd, **kw)
        try:
            wait_listening(source, p)
        except RuntimeError:
            err = b""
            if p.poll() is not None and p.stderr:
                err = p.stderr.read()
            raise RuntimeError("%s failed to listen on %s: %r" % (cmd, source, err))
        return p

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr, p.stdin):
                if f:
                    f.close()


class DatagramListener:
    """A unix datagram socket that keeps what it receives.

    The stand-in for systemd's notify socket or for /dev/log: bound at
    PATH, or at the abstract name ABSTRACT; .env is its address as
    NOTIFY_SOCKET gives it.  .messages holds each datagram, .lines all
    their lines.
    """

    def __init__(self, path=None, abstract=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.env = path if abstract is None else "@" + abstract
        try:
            self.sock.bind(path if abstract is None else "\0" + abstract)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.05)
        self.messages = []
        self.lines = []
        self.reader = None

    def follow(self):
        """Read in a thread of its own from now on.

        A daemon's notify messages block once about ten are queued unread
        (net.unix.max_dgram_qlen); a test that makes many connections
        before it looks at the messages needs this.
        """
        self.reader = threading.Thread(target=self._follow, daemon=True)
        self.reader.start()

    def _follow(self):
        while self.sock.fileno() >= 0:
            try:
                self._read(time.monotonic() + 0.5)
            except OSError:
                return

    def _read(self, until):
        while time.monotonic() < until:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return
            text = data.decode(errors="replace")
            self.messages.append(text)
            self.lines.extend(text.splitlines())

    def matches(self, line, text):
        """Whether LINE is what wait_for_text(TEXT) waits for: here, LINE contains TEXT."""
        return text in line

    def wait_for_text(self, text, timeout=10.0, since=0, proc=None):
        """The first line from .lines[SINCE] on that matches TEXT, read until it comes.

        Fails after TIMEOUT seconds, or as soon as PROC has exited without
        sending it.
        """
        def matching():
            exited = proc is not None and proc.poll() is not None
            found = next((l for l in self.lines[since:] if self.matches(l, text)), None)
            if found is None and self.reader is None:
                self._read(time.monotonic() + 0.05)
                found = next((l for l in self.lines[since:] if self.matches(l, text)), None)
            if found is None and exited:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError("exited with %s before sending %r (got %r): %s"
                                     % (proc.returncode, text, self.lines, err))
            return found
        line = wait_for(matching, timeout, step=0 if self.reader is None else 0.02)
        if line is None:
            raise AssertionError("no datagram with %r; got %r" % (text, self.lines))
        return line

    def collect(self, seconds):
        """Read for SECONDS; return the lines that arrived meanwhile."""
        start = len(self.lines)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read(deadline)
        return self.lines[start:]

    def close(self):
        self.sock.close()
        if self.reader is not None:
            self.reader.join(5)


class Notify(DatagramListener):
    """The stand-in for systemd's notify socket: its lines are VAR=value, matched whole."""

    STATUS_RE = re.compile(r"STATUS=(\d+) live, (\d+) total")

    def matches(self, line, text):
        return line == text

    def statuses(self):
        return [tuple(map(int, m.groups())) for m in map(self.STATUS_RE.match, self.lines) if m]


@pytest.fixture
def devlog():
    """A DatagramListener bound at /dev/log for the test, or None if impossible
    (something else is there already, or it may not be bound)."""
    path = "/dev/log"
    if os.path.lexists(path):
        yield None
        return
    try:
        listener = DatagramListener(path)
    except OSError:
        yield None
        return
    ident = os.lstat(path).st_ino
    try:
        yield listener
    finally:
        listener.close()
        try:
            if os.lstat(path).st_ino == ident:
                os.unlink(path)
        except OSError:
            pass


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.kill_all()


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    return str(path)


@pytest.fixture
def otherkey(tmp_path):
    path = tmp_path / "otherkey"
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o600)
    return str(path)


class TargetServer:
    """A listening target that runs handle(conn) in a thread per connection.

    ADDR is a unix path or "[host]:port" (default: a free port on
    127.0.0.1); .addr is the address to give spiped.  Counts accepted
    connections and records their peers.  The one accept loop of the tests:
    a subclass sets backlog, accept_timeout (the loop ends when no
    connection comes for that long) and max_connections (the loop ends
    after that many), and overrides handle() and, for what must be decided
    in accept order, on_accept().
    """

    backlog = 128
    accept_timeout = None
    max_connections = None

    def __init__(self, addr=None):
        if addr is None:
            addr = tcp_addr(0)
        if addr.startswith("/"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(addr)
            self.addr = addr
        else:
            host, port = addr.rsplit(":", 1)
            host = host.strip("[]")
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(fam, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, int(port)))
            self.addr = "[%s]:%d" % (host, self.sock.getsockname()[1])
        self.sock.listen(self.backlog)
        self.sock.settimeout(self.accept_timeout)
        self.lock = threading.Lock()
        self.connections = 0
        self.peers = []
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.max_connections is None or self.connections < self.max_connections:
            try:
                c, peer = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.peers.append(peer)
                more = self.on_accept(c)
            threading.Thread(target=self._run, args=(c, more), daemon=True).start()

    def _run(self, c, more):
        try:
            self.handle(c, *more)
        except OSError:
            pass
        finally:
            c.close()

    def on_accept(self, conn):
        """Called in the accept loop, in accept order, with self.lock held.

        Returns the further arguments handle(conn, ...) gets (none here).
        """
        return ()

    def handle(self, conn):
        raise NotImplementedError

    def close(self):
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class EchoServer(TargetServer):
    """A target that echoes each connection until EOF, then half-closes.

    Records every byte it received, per connection.
    """

    def __init__(self, addr=None, mode="echo"):
        self.mode = mode
        self.received = []
        super().__init__(addr)

    def handle(self, c):
        got = bytearray()
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                got += data
                if self.mode == "echo":
                    c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            # Wait for the peer to close.
            c.settimeout(10)
            while c.recv(65536):
                pass
        finally:
            with self.lock:
                self.received.append(bytes(got))

    def total_received(self):
        with self.lock:
            return sum(len(r) for r in self.received)


@pytest.fixture
def echo():
    servers = []

    def make(addr=None, mode="echo"):
        s = EchoServer(addr, mode)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def exchange(addr, payload, timeout=60.0, shutdown=True):
    """Send PAYLOAD to ADDR while reading; half-close; return all bytes read."""
    s = connect(addr, timeout=timeout)
    out = bytearray()

    def reader():
        try:
            while True:
                d = s.recv(262144)
                if not d:
                    break
                out.extend(d)
        except OSError:
            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if payload:
            s.sendall(payload)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    t.join(timeout)
    s.close()
    return bytes(out)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def thread_and_fd_count(pid):
    with open("/proc/%d/status" % pid) as f:
        threads = next(int(l.split()[1]) for l in f if l.startswith("Threads:"))
    fds = len(os.listdir("/proc/%d/fd" % pid))
    return threads, fds


def rss_kib(pid, field="VmRSS"):
    """PID's resident memory in KiB (FIELD="VmHWM": its peak so far)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def terminate(proc, sig=signal.SIGTERM, timeout=10):
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)
