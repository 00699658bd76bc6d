"""Shared fixtures: key files, ports, an echo target, and daemons (ours or C).

Every process started here is killed by PID in teardown and waited for.
Daemons are started with -F; readiness is read from /proc/net (no probe
connection is made, so connection counts stay exact).
"""
import hashlib
import os
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


def wait_listening(addr, proc=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if address_listening(addr):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening on %s" % (proc.returncode, addr))
        time.sleep(0.01)
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
    connections and records their peers.
    """

    backlog = 128

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
        self.lock = threading.Lock()
        self.connections = 0
        self.peers = []
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, peer = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.peers.append(peer)
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c):
        try:
            self.handle(c)
        except OSError:
            pass
        finally:
            c.close()

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


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def terminate(proc, sig=signal.SIGTERM, timeout=10):
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def wait_for(pred, timeout=10.0, what="condition"):
    """PRED()'s first true value, polled until TIMEOUT seconds; AssertionError after."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("%s not met after %.1fs" % (what, timeout))
        time.sleep(0.02)
