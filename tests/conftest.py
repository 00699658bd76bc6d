"""Shared fixtures: key files, ports, an echo target, and daemons (ours or C).

Every process started here is killed by PID in teardown and waited for.
Daemons are started with -F, their stderr in a file of their own (Daemon.log);
readiness is read from /proc/net (no probe connection is made, so
connection counts stay exact).  Tests wait on events with wait_for(); the
only fixed spans of time are assert_stays()'s "nothing happens" checks.
"""
import hashlib
import os
import re
import select
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


def assert_stays(predicate, seconds, step=0.05, what=None):
    """Fail as soon as PREDICATE is false; return once it held for SECONDS.

    For "nothing appears" checks (no line is logged, a client is not
    served): the time is what is tested, and it is spent watching.  WHAT
    (a string, or a function giving one) says what stopped holding.
    """
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if not value:
            message = what() if callable(what) else what
            raise AssertionError(message or "stopped holding within %.1f s" % seconds)
        if time.monotonic() >= deadline:
            return value
        time.sleep(step)


def unavailable(why):
    """A missing prerequisite: fail where the tests are required (CI=true or
    SPIPED_REQUIRE_INTEGRATION=1), skip with WHY elsewhere."""
    if os.environ.get("CI") == "true" or os.environ.get("SPIPED_REQUIRE_INTEGRATION") == "1":
        pytest.fail("%s (required here: CI=true or SPIPED_REQUIRE_INTEGRATION=1)" % why,
                    pytrace=False)
    pytest.skip(why)


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


def write_key(path, data=None, mode=0o600):
    """A key file at PATH holding DATA (32 random bytes unless given), mode MODE; PATH as a str."""
    with open(path, "wb") as f:
        f.write(os.urandom(32) if data is None else data)
    os.chmod(path, mode)
    return str(path)


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


def recv_all(sock, reset_ends=False):
    """All bytes from SOCK up to its EOF.

    RESET_ENDS: a reset ends the stream too; otherwise an error (a timeout
    among them) propagates.
    """
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        if not reset_ends:
            raise
    return bytes(data)


def echoed(sock, data):
    """Send DATA on the connected SOCK and read as many bytes back (an echo at the far end)."""
    sock.sendall(data)
    return recv_exact(sock, len(data))


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
        status = None if proc is None else proc.poll()
        if status is not None:
            raise RuntimeError("process exited with %s before listening on %s" % (status, addr))
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


def quiet(sock):
    """True while nothing can be read from SOCK: no data, no end of stream."""
    return not select.select([sock], [], [], 0)[0]


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


# Put the descriptors listed in argv[1] (comma separated, maybe none) on
# fds 3, 4, ... with LISTEN_FDS saying how many, set each variable named in
# argv[2] (comma separated) to this very PID, and exec argv[3:]: exec keeps
# the PID, so LISTEN_PID (or WATCHDOG_PID) names the program systemd started.
ACTIVATE = r"""
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
top = 3 + len(fds)
copies = [fcntl.fcntl(fd, fcntl.F_DUPFD, top) for fd in fds]  # clear of the fds 3, 4, ...
for n, fd in enumerate(copies):
    os.dup2(fd, 3 + n)
for fd in copies + [fd for fd in fds if fd >= top]:
    os.close(fd)
if fds:
    os.environ["LISTEN_FDS"] = str(len(fds))
for name in filter(None, sys.argv[2].split(",")):
    os.environ[name] = str(os.getpid())
os.execv(sys.argv[3], sys.argv[3:])
"""

SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID")


def clean_env(**extra):
    """The test's environment without the variables systemd passes a service, plus EXTRA."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env.update(extra)
    return env


def _feed(pipe, data):
    """Write DATA (bytes, or a binary file copied a MiB at a time) to PIPE, then close it."""
    try:
        if isinstance(data, bytes):
            pipe.write(data)
        else:
            for chunk in iter(lambda: data.read(1 << 20), b""):
                pipe.write(chunk)
    except (OSError, ValueError):  # the process is gone, or teardown closed the pipe
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


class Daemon:
    """A long-running process a test started through Procs.

    .proc is its Popen, .pid its PID, .addr the first address it was
    waited on to listen (its -s source), .log the file its stderr goes to.
    """

    def __init__(self, proc, addr, log):
        self.proc, self.pid, self.addr, self.log = proc, proc.pid, addr, log

    def log_text(self):
        return read_text(self.log)

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout=None):
        return self.proc.wait(timeout)

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        self.proc.kill()


class Procs:
    """Processes started by one test; all killed by PID and reaped at the end.

    start() runs any command; daemon() is the one way to start a daemon (ours,
    C's or anything else): its stderr goes to a file in FOLDER and it is
    waited on until it listens.  spiped(), chain() and activated() build the
    usual command lines on it.
    """

    def __init__(self, folder):
        self.folder = str(folder)
        self.procs = []

    def start(self, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def daemon(self, cmd, *listening, input=None, name="daemon", timeout=10.0, **kw):
        """Start CMD with its stderr in a file; a Daemon once it listens on each of LISTENING.

        INPUT (bytes, or a binary file) is fed to its stdin through a pipe
        (a key for -k -).  Fails, showing the log, if CMD exits first.
        """
        log = os.path.join(self.folder, "%s.%d.log" % (name, len(self.procs) + 1))
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        with open(log, "wb") as err:
            proc = self.start(cmd, stderr=err, **kw)
        if input is not None:
            threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True).start()
        daemon = Daemon(proc, listening[0] if listening else None, log)
        for addr in listening:
            try:
                wait_listening(addr, proc, timeout)
            except RuntimeError as e:
                raise RuntimeError("%s: %s; its stderr:\n%s" % (cmd, e, daemon.log_text()))
        return daemon

    def spiped(self, mode, target, key, *extra, source=None, impl="ours", **kw):
        """`spiped MODE -F -s SOURCE -t TARGET -k KEY EXTRA...` as a Daemon, once it listens.

        IMPL: "ours", "c", or a function that makes the command line from
        those arguments (a wrapper, a copy).  SOURCE: a free port on
        127.0.0.1 unless given.  KW goes to daemon().
        """
        source = source or tcp_addr(free_port())
        build = IMPLS[impl] if isinstance(impl, str) else impl
        name = "%s%s" % (impl if isinstance(impl, str) else "wrapped", mode)
        return self.daemon(build(mode, "-F", "-s", source, "-t", target, "-k", key, *extra),
                           source, name=name, **kw)

    def chain(self, target, key, e_impl="ours", d_impl="ours", e_extra=(), d_extra=(),
              e_source=None, d_source=None, e_key=None, **kw):
        """-e -> -d -> TARGET, the -d started first; (e, d), both Daemons.

        E_KEY: the -e end's key, if not KEY (a client with the wrong key).
        """
        d = self.spiped("-d", target, key, *d_extra, source=d_source, impl=d_impl, **kw)
        e = self.spiped("-e", d.addr, e_key or key, *e_extra, source=e_source, impl=e_impl, **kw)
        return e, d

    def activated(self, cmd, sockets=(), pid_vars=("LISTEN_PID",), env=None, **kw):
        """CMD started as systemd starts a service: SOCKETS (anything with
        fileno()) on fds 3, 4, ..., each variable in PID_VARS set to its PID.

        ENV: clean_env() unless given.  A Daemon; what it serves already
        listens, so nothing is waited for.
        """
        fds = [s.fileno() for s in sockets]
        launcher = [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), ",".join(pid_vars),
                    *cmd]
        return self.daemon(launcher, name="activated", env=clean_env() if env is None else env,
                           pass_fds=fds, **kw)

    def close(self):
        """Kill (SIGKILL) each process still running, then reap them all."""
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

        Fails after TIMEOUT seconds, or as soon as PROC (a Daemon) has
        exited without sending it.
        """
        def matching():
            status = None if proc is None else proc.poll()
            found = next((l for l in self.lines[since:] if self.matches(l, text)), None)
            if found is None and self.reader is None:
                self._read(time.monotonic() + 0.05)
                found = next((l for l in self.lines[since:] if self.matches(l, text)), None)
            if found is None and status is not None:
                raise AssertionError("exited with %s before sending %r (got %r): %s"
                                     % (status, text, self.lines, proc.log_text()))
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
def closing():
    """keep(THING) -> THING: everything kept is closed after the test, the last kept first.

    The one shape of a fixture that makes things: `return lambda ...: closing(Thing(...))`.
    """
    kept = []

    def keep(thing):
        kept.append(thing)
        return thing

    yield keep
    failed = None
    for thing in reversed(kept):
        try:
            thing.close()
        except Exception as e:  # the others are closed all the same
            failed = failed or e
    if failed is not None:
        raise failed


@pytest.fixture
def procs(tmp_path, closing):
    """The test's Procs: what it starts is killed and reaped after the test."""
    return closing(Procs(tmp_path))


@pytest.fixture
def keyfile(tmp_path):
    return write_key(tmp_path / "key")


@pytest.fixture
def otherkey(tmp_path):
    return write_key(tmp_path / "otherkey")


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
def echo(closing):
    """Makes EchoServer(ADDR, MODE)s, closed after the test."""
    return lambda addr=None, mode="echo": closing(EchoServer(addr, mode))


def exchange(addr, payload, timeout=60.0, shutdown=True, sock=None, until_eof=False):
    """Send PAYLOAD to ADDR (or on the connected SOCK) while reading; half-close;
    return all bytes read.

    UNTIL_EOF: fail unless the peer's EOF came within TIMEOUT (not a reset,
    not silence), and let an error in sending fail too.
    """
    s = sock or connect(addr, timeout=timeout)
    out = bytearray()
    ended = {}

    def reader():
        try:
            while True:
                d = s.recv(262144)
                if not d:
                    ended["eof"] = True
                    return
                out.extend(d)
        except OSError as e:
            ended["error"] = e

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if payload:
            s.sendall(payload)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
    except OSError:
        if until_eof:
            s.close()
            raise
    t.join(timeout)
    s.close()
    if until_eof:
        assert not t.is_alive(), "no EOF from %s within %ss" % (addr, timeout)
        assert ended.get("eof"), "reading from %s failed: %r" % (addr, ended.get("error"))
    return bytes(out)


def sha(data):
    return hashlib.sha256(data).hexdigest()


def check_echo(addr, payload, timeout=60.0, until_eof=False):
    """Assert that PAYLOAD comes back whole through ADDR (an echo at the far end).

    UNTIL_EOF: as in exchange().
    """
    got = exchange(addr, payload, timeout, until_eof=until_eof)
    assert len(got) == len(payload) and sha(got) == sha(payload), \
        "%d of %d bytes came back through %s (intact: %s)" % (
            len(got), len(payload), addr, got == payload[:len(got)])


def proc_state(pid):
    """The one-letter state of process PID (R, S, Z...), or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def pid_gone(pid):
    """True once PID has exited (a zombie not yet reaped counts as exited)."""
    return proc_state(pid) in (None, "Z", "X")


def proc_ids(pid):
    """(uids, gids, groups) of PID, each a list of ints, from /proc."""
    found = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                found[key] = [int(v) for v in value.split()]
    return found["Uid"], found["Gid"], found["Groups"]


def cpu_seconds(pid):
    """User and system CPU time PID has used, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
