"""A network test bed: hosts in network namespaces, links between them, and faults.

    client host "a" --link a-- server host "s" --link b (MTU 1280)-- client host "b"
        10.99.1.2         10.99.1.1 | 10.99.2.1               10.99.2.2
        fd99:1::2         fd99:1::1 | fd99:2::1               fd99:2::2

"s" routes between its two links, so "a" reaches "b" through it.  Each
host is a network namespace named after this process (parallel runs do
not meet) with its own hosts file, /etc/netns/NAME/hosts, which processes
started by start() (`ip netns exec`) see as /etc/hosts; set_host() edits it
in place, so a running daemon's next look-up sees the change.

The test process itself can act in a host: sockets made inside inside(host)
(or by a thread of thread(host, ...)) belong to that host for good, so
conftest's EchoServer, connect() and exchange() work there unchanged.

Faults are iptables rules (Rules: partition(), reject(), loss(), drop()),
tc's tbf rate limit (rate()), and DelayRelay, a TCP proxy that holds each
chunk 50 ms (this kernel has no netem).  Bed.close() kills every process
it started (by PID), stops its relays and deletes the namespaces and their
hosts files: everything it made, whatever state a test left.

Needs root, iproute2 and iptables (tests/run.sh installs them); probe()
says why a bed cannot be made here.  Addresses are 10.99.0.0/16 and
fd99::/16, used only inside the bed's own namespaces.
"""
import contextlib
import ctypes
import itertools
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time

CLONE_NEWNET = 0x40000000
RUN = 30  # seconds any ip, iptables or tc command may take

# host -> (its address on its link to "s", or "s"'s own on link a and b)
HOSTS = ("s", "a", "b")
LINKS = {  # link -> (the far host, its MTU, s's addresses, the far host's addresses)
    "a": ("a", 1500, ("10.99.1.1", "fd99:1::1"), ("10.99.1.2", "fd99:1::2")),
    "b": ("b", 1280, ("10.99.2.1", "fd99:2::1"), ("10.99.2.2", "fd99:2::2")),
}
IFACE = {"s": {"a": "link-a", "b": "link-b"}, "a": {"a": "link-s"}, "b": {"b": "link-s"}}

_libc = ctypes.CDLL(None, use_errno=True)
_serial = itertools.count(1)


def address(host, link=None, v6=False):
    """HOST's address (on LINK: "s" has one per link; the others only theirs)."""
    link = link or host
    near, far = LINKS[link][2], LINKS[link][3]
    return (near if host == "s" else far)[int(v6)]


def _setns(fd):
    """Move the calling thread into the network namespace open at FD."""
    if hasattr(os, "setns"):  # Python 3.12
        os.setns(fd, CLONE_NEWNET)
    elif _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: %s" % os.strerror(err))


def run(*cmd, check=True):
    """Run CMD (ip, iptables, tc ...); its output; RuntimeError with stderr on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN)
    if check and p.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(cmd), p.returncode, p.stderr.strip()))
    return p.stdout


def probe():
    """None if a bed can be made here, else why not."""
    if os.geteuid() != 0:
        return "the network bed needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "ip6tables", "tc"):
        if shutil.which(tool) is None:
            return "%s is not installed (apt-get install iproute2 iptables)" % tool
    name = "spnb%d-probe%d" % (os.getpid(), next(_serial))
    try:
        run("ip", "netns", "add", name)
    except (RuntimeError, OSError) as e:
        return "cannot make a network namespace: %s" % e
    try:
        run("ip", "netns", "exec", name, "iptables", "-w", "5", "-L", "INPUT")
        fd = os.open("/run/netns/" + name, os.O_RDONLY)
        os.close(fd)
    except (RuntimeError, OSError) as e:
        return "iptables or setns does not work in a namespace: %s" % e
    finally:
        run("ip", "netns", "del", name, check=False)
    return None


class Daemon:
    """A process started in a host: .proc, .pid, and its output in the file .log."""

    def __init__(self, proc, log):
        self.proc, self.pid, self.log = proc, proc.pid, log

    def output(self):
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")


class Rules:
    """iptables (and, with V6, ip6tables) rules in one host, added now; heal() removes them."""

    def __init__(self, bed, host, rules, v6=True):
        self.bed, self.host, self.rules = bed, host, []
        for rule in rules:  # (chain, match and target words)
            for tool in ("iptables", "ip6tables")[:1 + v6]:
                bed.exec(host, tool, "-w", "5", "-I", rule[0], *rule[1:])
                self.rules.append((tool,) + tuple(rule))

    def heal(self):
        while self.rules:
            tool, chain, *words = self.rules.pop()
            self.bed.exec(self.host, tool, "-w", "5", "-D", chain, *words)


class Bed:
    """Three hosts and two links, made at once; close() removes all of it."""

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.tag = "spnb%d-%d" % (os.getpid(), next(_serial))
        self.names = {}
        self.daemons = []
        self.relays = []
        try:
            for host in HOSTS:
                self._add_host(host)
            for link in LINKS:
                self._add_link(link)
            self.exec("s", "sysctl", "-qw", "net.ipv4.ip_forward=1",
                      "net.ipv6.conf.all.forwarding=1")
        except BaseException:
            self.close()
            raise

    def _add_host(self, host):
        name = "%s-%s" % (self.tag, host)
        run("ip", "netns", "add", name)
        self.names[host] = name
        os.makedirs("/etc/netns/" + name, exist_ok=True)
        with open(self.hosts_file(host), "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
        run("ip", "-n", name, "link", "set", "lo", "up")
        # A link taken down (link_state()) keeps its IPv6 addresses, as IPv4 ones are kept.
        self.exec(host, "sysctl", "-qw", "net.ipv6.conf.all.keep_addr_on_down=1",
                  "net.ipv6.conf.default.keep_addr_on_down=1")

    def _add_link(self, link):
        far, mtu, near_addrs, far_addrs = LINKS[link]
        s, other = self.names["s"], self.names[far]
        inner, outer = IFACE["s"][link], IFACE[far][link]
        run("ip", "link", "add", inner, "netns", s, "mtu", str(mtu), "type", "veth",
            "peer", "name", outer, "netns", other, "mtu", str(mtu))
        for ns, dev, (v4, v6) in ((s, inner, near_addrs), (other, outer, far_addrs)):
            run("ip", "-n", ns, "addr", "add", v4 + "/24", "dev", dev)
            run("ip", "-n", ns, "-6", "addr", "add", v6 + "/64", "dev", dev, "nodad")
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", other, "route", "add", "default", "via", near_addrs[0])
        run("ip", "-n", other, "-6", "route", "add", "default", "via", near_addrs[1])

    # -- acting in a host ----------------------------------------------------

    def hosts_file(self, host):
        return "/etc/netns/%s/hosts" % self.names[host]

    def exec(self, host, *cmd, check=True):
        """Run CMD in HOST to completion; its output."""
        return run("ip", "netns", "exec", self.names[host], *cmd, check=check)

    def start(self, host, cmd, name):
        """Start CMD in HOST (its output to WORKDIR/NAME.log); a Daemon, killed at close().

        `ip netns exec` execs CMD, so the PID is CMD's own.
        """
        log = os.path.join(self.workdir, "%s.log" % name)
        with open(log, "ab") as f:
            proc = subprocess.Popen(["ip", "netns", "exec", self.names[host], *cmd],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=f)
        daemon = Daemon(proc, log)
        self.daemons.append(daemon)
        return daemon

    @contextlib.contextmanager
    def inside(self, host):
        """The calling thread works in HOST's namespace meanwhile; sockets made stay there."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            there = os.open("/run/netns/" + self.names[host], os.O_RDONLY)
            try:
                _setns(there)
            finally:
                os.close(there)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def thread(self, host, target, *args):
        """Run TARGET(*ARGS) in a daemon thread that lives in HOST."""
        def body():
            fd = os.open("/run/netns/" + self.names[host], os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            target(*args)
        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t

    def set_host(self, host, name, addr):
        """NAME resolves to ADDR in HOST from now on: its hosts file edited in place.

        In place (same inode): `ip netns exec` bind-mounted the file over
        /etc/hosts of every process it started, and a new file would not
        show through.
        """
        path = self.hosts_file(host)
        with open(path, "r+") as f:
            lines = [l for l in f.read().splitlines() if l.split()[1:] != [name]]
            lines.append("%s\t%s" % (addr, name))
            f.seek(0)
            f.write("\n".join(lines) + "\n")
            f.truncate()

    def listening(self, daemon, port):
        """True once DAEMON's namespace has a TCP listener on PORT (read from its /proc)."""
        for table in ("tcp", "tcp6"):
            try:
                with open("/proc/%d/net/%s" % (daemon.pid, table)) as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                            return True
            except (OSError, StopIteration):
                return False
        return False

    def _tcp_rows(self, daemon):
        """(local port, remote port, state, bytes not yet acknowledged) of each TCP
        socket in DAEMON's namespace."""
        rows = []
        for table in ("tcp", "tcp6"):
            with open("/proc/%d/net/%s" % (daemon.pid, table)) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    rows.append((int(fields[1].rsplit(":", 1)[1], 16),
                                 int(fields[2].rsplit(":", 1)[1], 16), fields[3],
                                 int(fields[4].split(":")[0], 16)))
        return rows

    def established(self, daemon, port):
        """How many TCP connections on local PORT are established in DAEMON's namespace."""
        return sum(1 for local, _, state, _ in self._tcp_rows(daemon)
                   if state == "01" and local == port)

    def unacknowledged(self, daemon, port):
        """Bytes sent and not yet acknowledged on the connections from or to PORT
        in DAEMON's namespace (a delayed ACK, say)."""
        return sum(queued for local, remote, _, queued in self._tcp_rows(daemon)
                   if port in (local, remote))

    def wait_listening(self, daemon, port, timeout=15.0):
        deadline = time.monotonic() + timeout
        while not self.listening(daemon, port):
            if daemon.proc.poll() is not None:
                raise RuntimeError("exited with %s before listening on %d: %s"
                                   % (daemon.proc.returncode, port, daemon.output()))
            if time.monotonic() > deadline:
                raise RuntimeError("not listening on %d after %.0f s: %s"
                                   % (port, timeout, daemon.output()))
            time.sleep(0.02)
        return daemon

    # -- faults --------------------------------------------------------------

    def iface(self, host, link):
        return IFACE[host][link]

    def partition(self, link="a"):
        """Link LINK drops every packet, both ways (rules in "s"), until heal()."""
        dev = self.iface("s", link)
        return Rules(self, "s", [("INPUT", "-i", dev, "-j", "DROP"),
                                 ("OUTPUT", "-o", dev, "-j", "DROP"),
                                 ("FORWARD", "-i", dev, "-j", "DROP"),
                                 ("FORWARD", "-o", dev, "-j", "DROP")])

    def drop(self, host, link, *match, both_ways=False, v6=True):
        """HOST drops the packets arriving on LINK that MATCH (iptables words);
        BOTH_WAYS: those it sends there too."""
        dev = self.iface(host, link)
        rules = [("INPUT", "-i", dev, *match, "-j", "DROP")]
        if both_ways:
            rules.append(("OUTPUT", "-o", dev, *match, "-j", "DROP"))
        return Rules(self, host, rules, v6)

    def reject(self, host, link, *match):
        """HOST answers the TCP packets arriving on LINK that MATCH with a reset."""
        return Rules(self, host, [("INPUT", "-i", self.iface(host, link), "-p", "tcp", *match,
                                   "-j", "REJECT", "--reject-with", "tcp-reset")])

    def loss(self, link, probability):
        """Each packet on LINK, either way, is lost with PROBABILITY: a list of Rules."""
        far = LINKS[link][0]
        words = ("-m", "statistic", "--mode", "random", "--probability", str(probability))
        return [self.drop("s", link, *words), self.drop(far, link, *words)]

    def rate(self, host, link, rate="1mbit"):
        """HOST sends on LINK at most RATE (tc tbf); undone by the namespace's deletion."""
        run("tc", "-n", self.names[host], "qdisc", "replace", "dev", self.iface(host, link),
            "root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")

    def link_state(self, host, link, up):
        run("ip", "-n", self.names[host], "link", "set", self.iface(host, link),
            "up" if up else "down")

    def kernel_keepalive(self, host, times):
        """HOST's kernel keepalive timers (idle, interval, count): what a socket with
        SO_KEEPALIVE and no timers of its own uses (C spiped's case)."""
        idle, interval, count = times
        self.exec(host, "sysctl", "-qw", "net.ipv4.tcp_keepalive_time=%d" % idle,
                  "net.ipv4.tcp_keepalive_intvl=%d" % interval,
                  "net.ipv4.tcp_keepalive_probes=%d" % count)

    def relay(self, host, listen, upstream, delay=0.05):
        """A DelayRelay in HOST from LISTEN to UPSTREAM ((host, port) pairs); stopped at close()."""
        r = DelayRelay(self, host, listen, upstream, delay)
        self.relays.append(r)
        return r

    # -- the end -------------------------------------------------------------

    def close(self):
        """Kill our processes (by PID), stop relays, delete namespaces and hosts files."""
        for d in self.daemons:
            if d.proc.poll() is None:
                try:
                    d.proc.send_signal(signal.SIGKILL)
                except OSError:
                    pass
        for d in self.daemons:
            try:
                d.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for r in self.relays:
            r.close()
        for name in self.names.values():
            run("ip", "netns", "del", name, check=False)
            shutil.rmtree("/etc/netns/" + name, ignore_errors=True)
        self.names = {}


class DelayRelay:
    """A TCP proxy that forwards each chunk DELAY seconds after it came, both ways.

    The delay line holds at most QUEUE chunks per direction: a slow reader
    downstream slows the writer upstream, as a network path does.
    """

    CHUNK = 16384
    QUEUE = 8

    def __init__(self, bed, host, listen, upstream, delay):
        self.upstream, self.delay = upstream, delay
        self.sockets = []
        with bed.inside(host):
            family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(listen)
            self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        bed.thread(host, self._accept)

    def _accept(self):
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.upstream, timeout=10)
                far.settimeout(None)
            except OSError:
                near.close()
                continue
            self.sockets += [near, far]
            for src, dst in ((near, far), (far, near)):
                line = queue.Queue(self.QUEUE)
                threading.Thread(target=self._read, args=(src, line), daemon=True).start()
                threading.Thread(target=self._write, args=(line, dst), daemon=True).start()

    def _read(self, src, line):
        while True:
            try:
                data = src.recv(self.CHUNK)
            except OSError:
                data = b""
            line.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, line, dst):
        """Write each chunk of LINE to DST when it is due, then half-close DST.  After
        a failed write it keeps taking chunks (unwritten): the reader never blocks."""
        failed = False
        while True:
            due, data = line.get()
            if not data:
                break
            if not failed:
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    dst.sendall(data)
                except OSError:
                    failed = True
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        for s in [self.listener] + self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
