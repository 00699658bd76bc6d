"""Across networks: ours and C spiped between hosts of the bed (tests/netbed.py), under faults.

The usual tunnel: a client in host "a" -> -e in "a" ([127.0.0.1]:7200) ->
link a -> -d in "s" ([0.0.0.0]:7100) -> an echo target in "s".  Each fault
runs with ours in both roles and with C in both roles (pytest ids
"e=ours,d=ours" and "e=C,d=C"; SPIPED_HEAVY=1 adds the mixed pairs), and
ends byte-exact or in a clean close, after which our daemons are back to
their baseline of descriptors and threads, logged no traceback, and the
tunnel serves the next connection.

Keepalive: ours gets --keepalive 1,1,2 (and with it a user timeout of
1 + 1 x 2 = 3 s); C has no such option, so its host's kernel keepalive
timers are set to the same values (C turns SO_KEEPALIVE on, as ours does
without -j).  C sets no user timeout: with data in flight it is not reaped
until the partition heals.

What each test measured (seconds until reaped, thread and descriptor
counts, throughput) goes into the test's user_properties, and, with
SPIPED_NETBED_REPORT=FILE, one JSON line per test into FILE.
"""
import json
import os
import socket
import threading
import time

import pytest

import netbed
from conftest import (HAVE_C, IMPLS, TargetServer, connect, drain, exchange, recv_exact,
                      rss_kib, thread_and_fd_count, unavailable, wait_for)
from test_faults import Baseline, assert_no_leak
from test_metrics import metric
from test_proxy import Recorder, send_all

pytestmark = [pytest.mark.netbed, pytest.mark.timeout(180)]

HEAVY = os.environ.get("SPIPED_HEAVY") == "1"
PAIRS = [("ours", "ours"), ("c", "c")] + ([("ours", "c"), ("c", "ours")] if HEAVY else [])
KEEPALIVE = (1, 1, 2)                 # idle, interval, count
USER_TIMEOUT = KEEPALIVE[0] + KEEPALIVE[1] * KEEPALIVE[2]   # seconds, what ours sets
HOLD = 2 * USER_TIMEOUT               # long enough for ours to cut, with a margin
REAPED_WITHIN = 20.0                  # a bound for every wait on a close, never a goal
D_PORT, E_PORT = 7100, 7200          # fixed: every host is a namespace of the test's own
KiB, MiB = 1 << 10, 1 << 20
NAMES = {"ours": "ours", "c": "C"}    # in test ids


@pytest.fixture(scope="session")
def bed_possible():
    reason = netbed.probe()
    if reason is None and not HAVE_C:
        reason = "C spiped is not installed (apt-get install spiped)"
    return reason


@pytest.fixture
def bed(tmp_path, bed_possible):
    if bed_possible is not None:
        unavailable(bed_possible)
    b = netbed.Bed(tmp_path)
    yield b
    b.close()


@pytest.fixture(params=PAIRS, ids=lambda p: "e=%s,d=%s" % tuple(NAMES[i] for i in p))
def pair(request):
    return request.param


class Target(TargetServer):
    """An echo target that keeps, per connection, its socket and when it ended
    (EOF or reset).  Clearing .reading makes it stop reading."""

    def __init__(self, addr):
        self.conns, self.ended = [], []
        self.reading = threading.Event()
        self.reading.set()
        super().__init__(addr)

    def on_accept(self, conn):
        self.conns.append(conn)
        self.ended.append(None)
        return (len(self.conns) - 1,)

    def handle(self, c, index):
        try:
            while self.reading.wait(REAPED_WITHIN * 3):
                data = c.recv(65536)
                if not data:
                    c.shutdown(socket.SHUT_WR)
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            self.ended[index] = time.monotonic()


@pytest.fixture
def target_in(bed):
    """make(host, addr) -> a Target listening in HOST; all closed at the end."""
    made = []

    def make(host, addr="[127.0.0.1]:0"):
        with bed.inside(host):
            made.append(Target(addr))
        return made[-1]

    yield make
    for t in made:
        t.close()


def start_spiped(bed, host, impl, mode, port, target, key, *extra, keepalive=None,
                 bind="0.0.0.0"):
    """IMPL's spiped -MODE in HOST on [BIND]:PORT -> TARGET, listening; a netbed.Daemon.

    KEEPALIVE (idle, interval, count): --keepalive for ours, the host's
    kernel timers for C.  Ours logs its connections.
    """
    args = ["-F", "-" + mode, "-s", "[%s]:%d" % (bind, port), "-t", target, "-k", key, *extra]
    if impl == "ours":
        args.append("--log-connections")
        if keepalive is not None:
            args += ["--keepalive", "%d,%d,%d" % keepalive]
    elif keepalive is not None:
        bed.kernel_keepalive(host, keepalive)
    daemon = bed.start(host, IMPLS[impl](*args), "%s-%s-%s-%d" % (host, mode, impl, port))
    daemon.impl, daemon.role = impl, mode
    return bed.wait_listening(daemon, port)


def tunnel(bed, pair, key, target, e_extra=(), d_extra=(), keepalive=None, e_host="a",
           e_target=None, d_bind="0.0.0.0"):
    """The usual tunnel for PAIR (impl of -e, impl of -d) to TARGET; (-e, -d)."""
    d = start_spiped(bed, "s", pair[1], "d", D_PORT, target, key, *d_extra,
                     keepalive=keepalive, bind=d_bind)
    e_target = e_target or "[%s]:%d" % (netbed.address("s", e_host), D_PORT)
    e = start_spiped(bed, e_host, pair[0], "e", E_PORT, e_target, key, *e_extra,
                     keepalive=keepalive, bind="127.0.0.1")
    return e, d


def serves(bed, host="a", size=256 * KiB, port=E_PORT):
    """True if a fresh connection from HOST through the tunnel echoes SIZE bytes exactly."""
    data = os.urandom(size)
    with bed.inside(host):
        return exchange("[127.0.0.1]:%d" % port, data, timeout=60) == data


def settle(bed, daemons, host="a"):
    """One connection through the tunnel, then each of our daemons' Baseline."""
    assert serves(bed, host)
    return {d: Baseline(d.pid) for d in daemons if d.impl == "ours"}


def recovered(bed, daemons, bases, host="a", size=256 * KiB):
    """The end of every fault: ours back to its baseline, no traceback, the next
    connection (SIZE bytes each way) served.  Returns {role: (threads, fds)} of
    our daemons."""
    counts = {}
    for d, base in bases.items():
        assert_no_leak(d.pid, base, "%s -%s" % (d.impl, d.role))
        counts[d.role] = thread_and_fd_count(d.pid)
    for d in daemons:
        assert d.proc.poll() is None, d.output()
        assert "Traceback" not in d.output(), d.output()
    assert serves(bed, host, size), "the tunnel serves no next connection"
    return counts


def note(request, **row):
    """Keep what a test measured (see the module docstring)."""
    request.node.user_properties.append(("netbed", row))
    path = os.environ.get("SPIPED_NETBED_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(dict(test=request.node.name, **row)) + "\n")


def hold(bed, host="a"):
    """A client connection from HOST through the tunnel that has carried one echo."""
    with bed.inside(host):
        sock = connect("[127.0.0.1]:%d" % E_PORT, timeout=30)
    sock.sendall(b"ping")
    assert recv_exact(sock, 4) == b"ping"
    return sock


class Watch:
    """Reads SOCK in a thread until it ends: .at (monotonic) and .how ("eof", "reset")."""

    def __init__(self, sock):
        self.at = self.how = None
        self.got = 0
        threading.Thread(target=self._read, args=(sock,), daemon=True).start()

    def _read(self, sock):
        sock.settimeout(None)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    self.how = "eof"
                    break
                self.got += len(data)
        except OSError as e:
            self.how = "reset" if isinstance(e, ConnectionResetError) else str(e)
        self.at = time.monotonic()


def since(t0, at):
    return None if at is None else round(at - t0, 1)


# ---------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("load", ["idle", "up", "down"])
def test_partition(bed, pair, keyfile, target_in, load, request):
    """The link drops everything while a connection is held: idle, or just after the
    client (up) or the target (down) sent 64 KiB, which the sending side then
    holds unacknowledged.  Keepalive reaps the idle sides; ours' user timeout
    reaps a side with data in flight, C's stays until the link heals and the
    peer's host answers its retransmission with a reset."""
    target = target_in("s")
    e, d = tunnel(bed, pair, keyfile, target.addr, keepalive=KEEPALIVE)
    bases = settle(bed, (e, d))
    client = hold(bed)
    index = len(target.conns) - 1
    client_end = Watch(client)
    # Idle means idle: no packet of the echo still waits for a (delayed) ACK.
    assert wait_for(lambda: not any(bed.unacknowledged(x, D_PORT) for x in (e, d)), 10)
    cut = bed.partition("a")
    t0 = time.monotonic()
    if load == "up":
        client.sendall(os.urandom(64 * KiB))
    elif load == "down":
        target.conns[index].sendall(os.urandom(64 * KiB))
    ends = {"e": lambda: client_end.at, "d": lambda: target.ended[index]}
    stays = [side for side, daemon in (("e", e), ("d", d))
             if daemon.impl == "c" and load == {"e": "up", "d": "down"}[side]]
    reaped = [side for side in ends if side not in stays]
    assert wait_for(lambda: all(ends[s]() for s in reaped), REAPED_WITHIN), (
        "not reaped within %.0f s: %s" % (REAPED_WITHIN, [s for s in reaped if not ends[s]()]))
    if stays:
        assert not wait_for(lambda: ends[stays[0]](), max(0.0, t0 + HOLD - time.monotonic()))
    cut.heal()
    assert wait_for(lambda: all(end() for end in ends.values()), REAPED_WITHIN)
    for daemon in (e, d):
        if daemon.impl == "ours":
            assert "dropped (Connection timed out)" in daemon.output(), daemon.output()
    counts = recovered(bed, (e, d), bases)
    note(request, fault="partition, %s" % load, e_reaped=since(t0, ends["e"]()),
         d_reaped=since(t0, ends["d"]()), stayed_until_healed=stays, counts=counts)


def test_partition_during_handshake(bed, pair, keyfile, target_in, request):
    """Every packet that carries data is dropped on link a, so connections are made
    but no handshake byte arrives: -o 2 ends both sides."""
    target = target_in("s")
    e, d = tunnel(bed, pair, keyfile, target.addr, e_extra=("-o", "2"), d_extra=("-o", "2"))
    bases = settle(bed, (e, d))
    # IPv4 + TCP with timestamps is 52 bytes: SYNs and bare ACKs pass, data does not.
    cut = bed.drop("s", "a", "-p", "tcp", "-m", "length", "--length", "81:65535",
                   both_ways=True, v6=False)
    with bed.inside("a"):
        client = connect("[127.0.0.1]:%d" % E_PORT, timeout=30)
    client_end = Watch(client)
    t0 = time.monotonic()
    assert wait_for(lambda: bed.established(d, D_PORT) == 1, 10)
    assert wait_for(lambda: client_end.at and bed.established(d, D_PORT) == 0, REAPED_WITHIN)
    e_at, d_at = client_end.at, time.monotonic()
    assert client_end.got == 0
    cut.heal()
    if e.impl == "ours":
        assert "handshake failed" in e.output(), e.output()
    counts = recovered(bed, (e, d), bases)
    note(request, fault="partition during the handshake, -o 2", e_reaped=since(t0, e_at),
         d_reaped=since(t0, d_at), counts=counts)


# ---------------------------------------------------------------------------
# Resets, loss, MTU, rate and delay
# ---------------------------------------------------------------------------


def stream(bed, host="a"):
    """A connection from HOST that sends until it breaks and counts the echo: (sock, Watch)."""
    with bed.inside(host):
        sock = connect("[127.0.0.1]:%d" % E_PORT, timeout=30)
    watch = Watch(sock)

    def send():
        chunk = os.urandom(64 * KiB)
        deadline = time.monotonic() + 60
        try:
            while watch.at is None and time.monotonic() < deadline:
                sock.sendall(chunk)
        except OSError:
            pass
    threading.Thread(target=send, daemon=True).start()
    return sock, watch


@pytest.mark.parametrize("direction", ["up", "down"])
def test_reset_mid_transfer(bed, pair, keyfile, target_in, direction, request):
    """A reset injected into a busy connection: up, -e's packets to -d are answered
    with a reset (so -e gets it); down, -d's packets to -e (so -d gets it).
    The side that got it closes at once; the other learns from its peer's
    host (a reset) once the rule is gone."""
    target = target_in("s")
    e, d = tunnel(bed, pair, keyfile, target.addr)
    bases = settle(bed, (e, d))
    client, client_end = stream(bed)
    assert wait_for(lambda: client_end.got >= MiB, 30)
    index = len(target.conns) - 1
    t0 = time.monotonic()
    if direction == "up":
        rule = bed.reject("s", "a", "--dport", str(D_PORT))
    else:
        rule = bed.reject("a", "a", "--sport", str(D_PORT))
    ends = {"e": lambda: client_end.at, "d": lambda: target.ended[index]}
    first = ends["e" if direction == "up" else "d"]
    assert wait_for(first, REAPED_WITHIN)
    got_it = since(t0, first())
    rule.heal()
    # The other side learns when its next segment meets the peer's reset;
    # while the rule stood, its retransmissions backed off (doubling from
    # 200 ms), so the next one may come some seconds after the heal.
    assert wait_for(lambda: all(end() for end in ends.values()), 3 * REAPED_WITHIN)
    client.close()
    counts = recovered(bed, (e, d), bases)
    note(request, fault="reset %s" % direction, reset_seen=got_it, e_reaped=since(t0, ends["e"]()),
         d_reaped=since(t0, ends["d"]()), echoed=client_end.got, counts=counts)


def test_random_loss(bed, pair, keyfile, target_in, request):
    """3% of the packets on link a lost either way: 16 MiB each way arrive intact."""
    target = target_in("s")
    e, d = tunnel(bed, pair, keyfile, target.addr)
    bases = settle(bed, (e, d))
    bed.loss("a", 0.03)
    data = os.urandom(16 * MiB)
    t0 = time.monotonic()
    with bed.inside("a"):
        got = exchange("[127.0.0.1]:%d" % E_PORT, data, timeout=120)
    seconds = time.monotonic() - t0
    assert got == data
    counts = recovered(bed, (e, d), bases)
    note(request, fault="3% loss, 16 MiB each way", seconds=round(seconds, 1), counts=counts)


def test_ipv6_over_the_mtu_1280_link(bed, pair, keyfile, target_in, request):
    """From host b over link b (MTU 1280) by IPv6: segments fit the link, 4 MiB intact."""
    target = target_in("s")
    e, d = tunnel(bed, pair, keyfile, target.addr, e_host="b", d_bind="::",
                  e_target="[%s]:%d" % (netbed.address("s", "b", v6=True), D_PORT))
    bases = settle(bed, (e, d), host="b")
    client = hold(bed, "b")
    shown = bed.exec("b", "ss", "-tinH", "dst", "[%s]" % netbed.address("s", "b", v6=True))
    client.close()
    mss = [int(w.split(":")[1]) for w in shown.split() if w.startswith("mss:")]
    assert mss and all(m <= 1280 - 40 - 20 for m in mss), shown
    data = os.urandom(4 * MiB)
    with bed.inside("b"):
        assert exchange("[127.0.0.1]:%d" % E_PORT, data, timeout=60) == data
    counts = recovered(bed, (e, d), bases, host="b")
    note(request, fault="IPv6, MTU 1280", mss=mss, counts=counts)


def test_rate_limit_with_delay(bed, pair, keyfile, target_in, request):
    """1 Mbit/s each way (tc tbf on both ends of link a) and 50 ms each way (a relay
    in front of -d): 1 MiB echoed intact; the memory of our daemons stays
    bounded while the client writes far faster than the link carries."""
    target = target_in("s")
    d = start_spiped(bed, "s", pair[1], "d", D_PORT, target.addr, keyfile, bind="127.0.0.1")
    relay = bed.relay("s", (netbed.address("s", "a"), 0), ("127.0.0.1", D_PORT))
    e = start_spiped(bed, "a", pair[0], "e", E_PORT,
                     "[%s]:%d" % (netbed.address("s", "a"), relay.port), keyfile,
                     bind="127.0.0.1")
    bases = settle(bed, (e, d))
    bed.rate("s", "a")
    bed.rate("a", "a")
    before = {x.role: rss_kib(x.pid, "VmHWM") for x in (e, d)}
    data = os.urandom(MiB)
    t0 = time.monotonic()
    with bed.inside("a"):
        got = exchange("[127.0.0.1]:%d" % E_PORT, data, timeout=120)
    seconds = time.monotonic() - t0
    assert got == data
    grown = {x.role: rss_kib(x.pid, "VmHWM") - before[x.role] for x in (e, d)}
    for x in (e, d):
        if x.impl == "ours":
            assert grown[x.role] < 16 * 1024, grown
    counts = recovered(bed, (e, d), bases, size=16 * KiB)
    note(request, fault="1 Mbit/s + 50 ms, 1 MiB each way", seconds=round(seconds, 1),
         mbit_per_s=round(8 * len(data) / seconds / 1e6, 2), peak_rss_growth_kib=grown,
         counts=counts)


# ---------------------------------------------------------------------------
# Names and hosts that move or go away
# ---------------------------------------------------------------------------


def test_target_name_moves_to_another_host(bed, pair, keyfile, target_in, request):
    """-e's target is a name; with -r 1 its new address (another host's, set in
    host a's hosts file) takes the new connections, and a live one stays."""
    here, there = target_in("s"), target_in("b")
    d = start_spiped(bed, "s", pair[1], "d", D_PORT, here.addr, keyfile)
    d_b = start_spiped(bed, "b", pair[1], "d", D_PORT, there.addr, keyfile)
    bed.set_host("a", "tunnel-end", netbed.address("s", "a"))
    e = start_spiped(bed, "a", pair[0], "e", E_PORT, "tunnel-end:%d" % D_PORT, keyfile,
                     "-r", "1", bind="127.0.0.1")
    bases = settle(bed, (e, d, d_b))
    live = hold(bed)
    assert len(here.conns) == 2 and not there.conns
    bed.set_host("a", "tunnel-end", netbed.address("b"))
    t0 = time.monotonic()
    assert wait_for(lambda: serves(bed, size=KiB) and there.conns, 15, step=0.2)
    moved = since(t0, time.monotonic())
    live.sendall(b"still here")
    assert recv_exact(live, 10) == b"still here"
    live.close()
    counts = recovered(bed, (e, d, d_b), bases)
    note(request, fault="target name moved, -r 1", followed_after=moved, counts=counts)


def test_target_host_gone_then_back(bed, pair, keyfile, target_in, request):
    """First -d's target host (b) goes away, then -e's (s): connects fail (ours logs
    each), clients are closed, and service resumes once the host is back."""
    target = target_in("b", "[%s]:0" % netbed.address("b"))
    e, d = tunnel(bed, pair, keyfile, target.addr, e_extra=("-o", "1"), d_extra=("-o", "1"))
    bases = settle(bed, (e, d))
    back_after = {}
    for host, link, failing in (("b", "b", d), ("s", "a", e)):
        bed.link_state(host, link, False)
        with bed.inside("a"):
            assert exchange("[127.0.0.1]:%d" % E_PORT, b"anyone?", timeout=30) == b""
        if failing.impl == "ours":
            assert wait_for(lambda: "failed: timed out" in failing.output(), 10), failing.output()
        bed.link_state(host, link, True)
        t0 = time.monotonic()
        assert wait_for(lambda: serves(bed, size=KiB), 20, step=0.2)
        back_after[host] = since(t0, time.monotonic())
    counts = recovered(bed, (e, d), bases)
    note(request, fault="target host gone, then back", served_again_after=back_after,
         counts=counts)


# ---------------------------------------------------------------------------
# A peer that stops reading
# ---------------------------------------------------------------------------


def stalled(bed, target, seconds, size=8 * MiB):
    """Echo SIZE bytes while TARGET reads nothing for SECONDS: (bytes back, when the
    client's connection ended, when reading resumed)."""
    data = os.urandom(size)
    result = {}
    target.reading.clear()

    def client():
        with bed.inside("a"):
            result["got"] = exchange("[127.0.0.1]:%d" % E_PORT, data, timeout=60)
        result["at"] = time.monotonic()
    t = threading.Thread(target=client, daemon=True)
    t.start()
    wait_for(lambda: "at" in result, seconds)  # a stall of SECONDS, or less if cut
    target.reading.set()
    resumed = time.monotonic()
    t.join(60)
    return result.get("got") == data, result.get("at"), resumed


def test_peer_that_stops_reading(bed, pair, keyfile, target_in, request):
    """The target stops reading: ours (with --keepalive, so a user timeout of 3 s)
    lets a 1 s stall pass and cuts a 6 s one; C lets both pass."""
    target = target_in("s")
    e, d = tunnel(bed, pair, keyfile, target.addr, keepalive=KEEPALIVE)
    bases = settle(bed, (e, d))
    short_ok, _, _ = stalled(bed, target, 1.0)
    assert short_ok
    t0 = time.monotonic()
    long_ok, ended, resumed = stalled(bed, target, HOLD)
    if "ours" in pair:
        assert not long_ok and ended < resumed
    else:
        assert long_ok
    counts = recovered(bed, (e, d), bases)
    note(request, fault="target stops reading 1 s, then 6 s", short_stall_survived=short_ok,
         long_stall_survived=long_ok, cut_after=since(t0, ended) if not long_ok else None,
         counts=counts)


# ---------------------------------------------------------------------------
# --allow and PROXY headers, from two hosts with addresses of their own
# ---------------------------------------------------------------------------

METRICS_PORT = 9100


def entry_points(bed, role, keyfile, target, *ours_args, far="c"):
    """Ours in ROLE in "s" on [::] with OURS_ARGS; FAR spiped in the other role where it
    belongs.  Returns (our daemon, its port, address(host, v6) a client in HOST dials)."""
    if role == "d":
        ours_d = start_spiped(bed, "s", "ours", "d", D_PORT, target.addr, keyfile, *ours_args,
                              bind="::")
        for host in "ab":
            for v6 in (False, True):
                start_spiped(bed, host, far, "e", E_PORT + v6,
                             "[%s]:%d" % (netbed.address("s", host, v6), D_PORT), keyfile,
                             bind="127.0.0.1")
        return ours_d, D_PORT, lambda host, v6: "[127.0.0.1]:%d" % (E_PORT + v6)
    start_spiped(bed, "s", far, "d", D_PORT, target.addr, keyfile, bind="127.0.0.1")
    ours_e = start_spiped(bed, "s", "ours", "e", E_PORT, "[127.0.0.1]:%d" % D_PORT, keyfile,
                          *ours_args, bind="::")
    return ours_e, E_PORT, lambda host, v6: "[%s]:%d" % (netbed.address("s", host, v6), E_PORT)


@pytest.mark.parametrize("role", ["e", "d"])
def test_allow_serves_one_host_and_refuses_the_other(bed, keyfile, target_in, role, request):
    """Ours -ROLE --allow <host a's IPv4 address> --allow <link a's IPv6 network> -n 1,
    C in the other role: host b, by IPv4 and IPv6, is closed before any byte,
    dials nothing, takes no slot and is logged once per address; host a is
    served.  Over IPv4 ours sees IPv4-mapped peers ([::] takes both)."""
    target = target_in("s")
    ours_args = ("-n", "1", "--allow", netbed.address("a"), "--allow", "fd99:1::/64",
                 "--metrics", "[127.0.0.1]:%d" % METRICS_PORT)
    daemon, port, dial = entry_points(bed, role, keyfile, target, *ours_args)
    bed.wait_listening(daemon, METRICS_PORT)
    for v6 in (False, True):
        for _ in range(2):
            with bed.inside("b"):
                assert exchange(dial("b", v6), b"let me in", timeout=30) == b""
        with bed.inside("b"):  # straight to ours: not one byte of a handshake
            sock = connect("[%s]:%d" % (netbed.address("s", "b", v6), port))
        sock.settimeout(10)
        assert drain(sock)[0] == b""
        sock.close()
    for v6 in (False, True):
        with bed.inside("a"):
            assert exchange(dial("a", v6), b"hello", timeout=30) == b"hello"
    tunnel = "[::]:%d" % port
    with bed.inside("s"):
        refused = metric("[127.0.0.1]:%d" % METRICS_PORT, "spiped_connections_refused_total",
                         tunnel)
        accepted = metric("[127.0.0.1]:%d" % METRICS_PORT, "spiped_connections_total", tunnel)
        limit = metric("[127.0.0.1]:%d" % METRICS_PORT,
                       "spiped_connection_limit_reached_total", tunnel)
    assert (refused, accepted, limit) == (6, 2, 2)
    assert len(target.conns) == 2
    log = daemon.output()
    for v6 in (False, True):
        line = "refused a connection from %s: not in --allow" % netbed.address("b", v6=v6)
        assert log.count(line) == 1, log
    assert "Traceback" not in log
    note(request, fault="--allow, -%s" % role, refused=refused, accepted=accepted)


def proxy_fields(data):
    """(source, destination, source port, destination port) of the PROXY header that
    DATA starts with (version 1 or 2, TCP), and the rest of DATA."""
    if data.startswith(b"PROXY "):
        line, _, rest = data.partition(b"\r\n")
        _, _, src, dst, sport, dport = line.decode().split(" ")
        return (src, dst, int(sport), int(dport)), rest
    family = {0x11: socket.AF_INET, 0x21: socket.AF_INET6}[data[13]]
    size = 4 if family == socket.AF_INET else 16
    block = data[16:16 + int.from_bytes(data[14:16], "big")]
    src, dst = (socket.inet_ntop(family, block[i * size:(i + 1) * size]) for i in (0, 1))
    ports = block[2 * size:]
    return ((src, dst, int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:4], "big")),
            data[16 + len(block):])


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("role", ["e", "d"])
def test_proxy_header_names_each_host(bed, keyfile, role, version, request):
    """Ours -ROLE --proxy-protocol VERSION in "s", C in the other role: connections from
    hosts a and b, by IPv4 and IPv6, reach the target behind a header naming
    the host that connected to ours (its address on its link) and the address
    of "s" it connected to."""
    with bed.inside("s"):
        target = Recorder()
    try:
        daemon, port, dial = entry_points(bed, role, keyfile, target,
                                          "--proxy-protocol", str(version))
        seen = []
        for host in "ab":
            for v6 in (False, True):
                payload = ("from %s over IPv%d" % (host, 6 if v6 else 4)).encode()
                with bed.inside(host):
                    sock = connect(dial(host, v6), timeout=30)
                client_port = sock.getsockname()[1]
                assert send_all(sock, payload) == b"done"
                fields, rest = proxy_fields(target.received(len(seen)))
                assert rest == payload
                assert fields[:2] == (netbed.address(host, v6=v6),
                                      netbed.address("s", host, v6)), fields
                assert fields[3] == port
                if role == "e":  # with -d, the port is that of C -e's own connection
                    assert fields[2] == client_port
                seen.append(fields)
        assert len({f[0] for f in seen}) == 4
    finally:
        target.close()
    assert "Traceback" not in daemon.output()
    note(request, fault="PROXY v%d from -%s" % (version, role), headers=seen)
