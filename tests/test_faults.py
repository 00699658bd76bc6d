"""Faults: hostile peers, stalled and slow clients, back-pressure, broken
connections, descriptor exhaustion, graceful shutdown under load, secrets.

The daemons are ours; C spiped runs the same fuzz cases (a tenth of them)
and the stalled-client test too, to show the expectations hold for the
reference, and it is the peer that gets killed in the SIGKILL tests.
After each fault the daemon must still serve a good client and must not
leak: its descriptor count returns to the baseline exactly, no thread is
left busy that was not busy before (e.g. a relay blocked on a socket), and
the thread count returns to the baseline too: each connection's two
threads end with it.

Hostile peers.  A seeded fuzzer plays a peer that is wrong on purpose, both
as the client of ``spiped -d`` and as the server behind ``spiped -e``.  Most
cases complete a valid handshake (both ends use -f, so no modular
exponentiation) and then send a mutated packet stream: bit flips, truncation,
extension, replayed and reordered packets, packets of another connection or of
the opposite direction, wrong packet numbers, a valid MAC over a length field
of 0 or above 1024, garbage of up to 1 MiB.  The others mutate the handshake
(nonce, y, MAC, y >= p, wrong key, truncation) or send raw garbage.  A
reference receiver written here (independent of spiped.py but for the
group-14 prime) decides what a correct daemon delivers: the plaintext of the
authentic, in-order packets before the first bad one.  When the stream must
be rejected the fuzzer does not half-close, so only detecting the cheat can
end the connection, and it must end within DROP_WITHIN seconds (the
daemons run with -o 30).  Each case needs its own connection (a bad packet
drops it), so eight client threads run in parallel; about 1000 cases per
second fit on two cores, so every case runs against the live daemons.

Environment:
    SPIPED_FUZZ_CASES  number of fuzz cases (default 10000; 80% go to -d,
                       20% to -e; C gets a tenth of each)
    SPIPED_FUZZ_SEED   master seed (default: a fixed one, so CI runs the same
                       cases every time; "random" draws one); printed in
                       every failure message, case i uses "SEED:d:i" / "SEED:e:i"
    SPIPED_HEAVY=1     heavier variants: 200000 fuzz cases unless
                       SPIPED_FUZZ_CASES says otherwise, 256 MiB through the
                       back-pressure test instead of 64 MiB, 40 transfers of
                       4 MiB in the SIGTERM test, and the leak checks wait
                       (up to 60 s) for the thread count itself to drop back
                       to the baseline (idle threads included)
"""
import base64
import builtins
import collections
import hashlib
import hmac
import os
import platform
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import (EchoServer, Notify, TargetServer, assert_stays, check_echo, clean_env,
                      connect, cpu_seconds, drain, exchange, free_port, key_of, need_c, ours,
                      quiet, recv_exact, rss_kib, sha, tcp_addr, thread_and_fd_count, wait_for,
                      write_key)
import spiped

try:
    from Cryptodome.Cipher import AES
except ImportError:  # Debian's python3-pycryptodome
    from Crypto.Cipher import AES

HEAVY = os.environ.get("SPIPED_HEAVY") == "1"
FUZZ_CASES = int(os.environ.get("SPIPED_FUZZ_CASES") or (200000 if HEAVY else 10000))
_SEED = os.environ.get("SPIPED_FUZZ_SEED", "20261125")
FUZZ_SEED = random.SystemRandom().randrange(1 << 32) if _SEED == "random" else int(_SEED)
FUZZ_THREADS = 8
CASE_TIMEOUT = 10.0      # socket timeout of every fuzz connection
DROP_WITHIN = 3.0        # a peer caught cheating must be dropped this fast
HANDSHAKE_O = "30"       # -o of the fuzzed daemons: a drop is never their timeout
MiB = 1 << 20

PACKET, PADDED, PAYLOAD = 1060, 1028, 1024
ONE = (1).to_bytes(256, "big")
PRIME = spiped.DH_PRIME
_be64 = struct.Struct(">Q").pack


# ---------------------------------------------------------------------------
# The protocol, written again here so that the daemon is judged by an
# independent reference (SPEC sections 3 and 4).
# ---------------------------------------------------------------------------


def kdf(key, salt, length):
    return hashlib.pbkdf2_hmac("sha256", key, salt, 1, length)


def mac(key, data):
    return hmac.digest(key, data, "sha256")


class Keys:
    """Traffic keys of one connection: (E, H) for client->server and server->client."""

    def __init__(self, key, nonce_c, nonce_s):
        dk = kdf(key, nonce_c + nonce_s + ONE, 128)
        self.up = (dk[0:32], dk[32:64])      # sent by the client
        self.down = (dk[64:96], dk[96:128])  # sent by the server


def _ctr(cipher_key, number):
    return AES.new(cipher_key, AES.MODE_CTR, nonce=b"", initial_value=number << 64)


def seal(keys, number, payload, length=None):
    """One 1060-byte packet; LENGTH overrides the length field (still MACed)."""
    if length is None:
        length = len(payload)
    padded = payload + bytes(PAYLOAD - len(payload)) + struct.pack(">I", length)
    ct = _ctr(keys[0], number).encrypt(padded)
    return ct + mac(keys[1], ct + _be64(number))


def reference_open(keys, wire):
    """(plaintext, bad): what a correct receiver delivers from WIRE followed by
    EOF, and whether it must drop the connection (MAC or length failure)."""
    out = []
    number = 0
    for base in range(0, len(wire) - PACKET + 1, PACKET):
        ct, tag = wire[base:base + PADDED], wire[base + PADDED:base + PACKET]
        if not hmac.compare_digest(mac(keys[1], ct + _be64(number)), tag):
            return b"".join(out), True
        padded = _ctr(keys[0], number).decrypt(ct)
        length = int.from_bytes(padded[PAYLOAD:], "big")
        if not 1 <= length <= PAYLOAD:
            return b"".join(out), True
        out.append(padded[:length])
        number += 1
    return b"".join(out), False


def send_quietly(sock, data, half_close=True):
    """sendall (then half-close) that tolerates a peer which already dropped us."""
    try:
        if data:
            sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return True
    except socket.timeout:
        raise
    except OSError:
        return False


def client_handshake(sock, key):
    """Our side of a valid -f handshake as the client; returns Keys."""
    nonce_c = os.urandom(32)
    sock.sendall(nonce_c)
    nonce_s = recv_exact(sock, 32)
    dk = kdf(key, nonce_c + nonce_s, 64)
    sock.sendall(ONE + mac(dk[:32], ONE))
    theirs = recv_exact(sock, 288)
    assert hmac.compare_digest(mac(dk[32:], theirs[:256]), theirs[256:]), "server DH MAC"
    return Keys(key, nonce_c, nonce_s)


def seal_stream(keys, data):
    return b"".join(seal(keys, i, data[k:k + PAYLOAD])
                    for i, k in enumerate(range(0, len(data), PAYLOAD)))


# ---------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------

PACKET_KINDS = {  # kind: weight
    "bitflip": 14, "truncate": 8, "extend": 8, "replay": 8, "reorder": 8,
    "foreign": 8, "reflect": 5, "wrong_number": 6, "big_length": 8,
    "zero_length": 4, "garbage_after": 6,
}
HANDSHAKE_KINDS = {
    "hs_flip_y": 3, "hs_flip_mac": 3, "hs_nonce": 2, "hs_big_y": 3,
    "hs_wrong_key": 2, "hs_reflect": 2, "hs_truncate": 2,
}
KINDS = dict(PACKET_KINDS, **HANDSHAKE_KINDS, garbage=5)
MAY_BE_VALID = ("truncate", "extend")  # a correct receiver may just see EOF


def flip_bits(rng, data, count):
    data = bytearray(data)
    for bit in rng.sample(range(len(data) * 8), count):
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def hostile_stream(rng, kind, keys, other, foreign):
    """A mutated packet stream for the direction whose keys are KEYS.

    OTHER: the opposite direction's keys; FOREIGN: keys of another
    connection to the same daemon.
    """
    count = rng.randint(1, 4)
    payloads = [rng.randbytes(rng.randint(1, PAYLOAD)) for _ in range(count)]
    packets = [seal(keys, i, p) for i, p in enumerate(payloads)]
    j = rng.randrange(count)
    if kind == "bitflip":
        packets[j] = flip_bits(rng, packets[j], rng.randint(1, 3))
    elif kind == "replay":
        packets.insert(rng.randint(j + 1, count), packets[j])
    elif kind == "reorder":
        if count == 1:
            packets.append(seal(keys, 1, rng.randbytes(10)))
            count = 2
        j, k = sorted(rng.sample(range(count), 2))
        packets[j], packets[k] = packets[k], packets[j]
    elif kind == "foreign":
        packets[j] = seal(foreign, j, payloads[j])
    elif kind == "reflect":
        packets[j] = seal(other, j, payloads[j])
    elif kind == "wrong_number":
        delta = rng.choice([1, 2, 1 << 32, (1 << 64) - 1 - j, rng.randrange(1, 1 << 63)])
        packets[j] = seal(keys, (j + delta) % (1 << 64), payloads[j])
    elif kind == "big_length":
        length = rng.choice([1025, 1028, 1060, 65536, 1 << 31, (1 << 32) - 1,
                             rng.randrange(1025, 1 << 32)])
        packets[j] = seal(keys, j, payloads[j], length)
    elif kind == "zero_length":
        packets[j] = seal(keys, j, payloads[j], 0)
    elif kind == "garbage_after":
        # At least one whole packet of garbage: less would be a partial
        # packet, which a correct receiver treats as a plain EOF.
        size = rng.choice([PACKET, rng.randint(PACKET, 64 * 1024), rng.randint(PACKET, 256 * 1024),
                           MiB + rng.randint(0, 4096)] if rng.random() < 0.05 else
                          [PACKET, PACKET + 1, rng.randint(PACKET, 64 * 1024)])
        packets[j:] = [rng.randbytes(size)]
    wire = b"".join(packets)
    if kind == "truncate":
        wire = wire[:rng.randrange(len(wire))]
    elif kind == "extend":
        at = rng.randint(0, len(wire))
        wire = wire[:at] + rng.randbytes(rng.randint(1, 2 * PACKET)) + wire[at:]
    return wire


def hostile_hello(rng, kind, key, own_nonce, peer_nonce, client):
    """A mutated DH message from a peer whose nonce is OWN_NONCE."""
    nonces = own_nonce + peer_nonce if client else peer_nonce + own_nonce
    dk = kdf(key, nonces, 64)
    own, peer = (dk[:32], dk[32:]) if client else (dk[32:], dk[:32])
    hello = ONE + mac(own, ONE)
    if kind == "hs_flip_y":
        return flip_bits(rng, ONE, rng.randint(1, 3)) + hello[256:]
    if kind == "hs_flip_mac":
        return ONE + flip_bits(rng, hello[256:], rng.randint(1, 3))
    if kind == "hs_nonce":  # the nonce was changed in transit
        own_nonce = flip_bits(rng, own_nonce, 1)
        nonces = own_nonce + peer_nonce if client else peer_nonce + own_nonce
        dk = kdf(key, nonces, 64)
        return ONE + mac(dk[:32] if client else dk[32:], ONE)
    if kind == "hs_big_y":
        y = rng.choice([PRIME, PRIME + 1, (1 << 2048) - 1, rng.randrange(PRIME, 1 << 2048)])
        y = y.to_bytes(256, "big")
        return y + mac(own, y)
    if kind == "hs_wrong_key":
        dk = kdf(hashlib.sha256(b"not the key").digest(), nonces, 64)
        return ONE + mac(dk[:32] if client else dk[32:], ONE)
    if kind == "hs_reflect":  # MACed with the other side's key
        return ONE + mac(peer, ONE)
    if kind == "hs_truncate":
        return hello[:rng.randrange(len(hello))]
    raise AssertionError(kind)


# ---------------------------------------------------------------------------
# Targets, daemons and measurements
# ---------------------------------------------------------------------------


class Recorder(TargetServer):
    """A TCP target that keeps every byte each connection sends it; never sends."""

    backlog = 1024

    def __init__(self):
        self.records = []
        self.open = 0
        super().__init__()

    def on_accept(self, conn):
        self.open += 1
        return ()

    def handle(self, conn):
        conn.settimeout(60)
        got, _ = drain(conn, limit=1 << 30)
        conn.close()
        with self.lock:
            self.records.append(got)
            self.open -= 1

    def idle(self):
        """No connection open and none waiting in the accept queue."""
        port = "%04X" % self.sock.getsockname()[1]
        with open("/proc/net/tcp") as f:
            for line in f:
                fields = line.split()
                # A listener's rx_queue is the length of its accept queue.
                if fields[1].endswith(":" + port) and fields[3] == "0A":
                    if int(fields[4].split(":")[1], 16):
                        return False
        with self.lock:
            return self.open == 0


class FaultTarget(TargetServer):
    """An echo target whose first connections misbehave as listed in PLAN.

    Plans: 'echo'; 'close_early' (echo 64 KiB, then close()); 'reset' (echo
    64 KiB, then SO_LINGER 0 and close()).  .ended holds one
    (plan, outcome, bytes received) per finished connection.
    """

    def __init__(self, plan=()):
        self.plan = list(plan)
        self.ended = []
        self.open = 0
        super().__init__()

    def on_accept(self, conn):
        self.open += 1
        return (self.plan.pop(0) if self.plan else "echo",)

    def handle(self, conn, plan):
        conn.settimeout(30)
        seen = 0
        outcome = "eof"
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                seen += len(data)
                conn.sendall(data)
                if plan != "echo" and seen >= 65536:
                    if plan == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    outcome = plan
                    break
            if outcome == "eof":
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
        except socket.timeout:
            outcome = "timeout"
        except OSError:
            outcome = "reset"
        finally:
            conn.close()
            with self.lock:
                self.ended.append((plan, outcome, seen))
                self.open -= 1


_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98}.get(platform.machine())


class Baseline:
    """A settled daemon's descriptor count, its threads, and which of them were busy.

    Busy: not sleeping in a timed wait (see _in_timed_wait), in any of three
    samples; e.g. the accept loop, or a thread that waits for work forever.
    """

    def __init__(self, pid, timeout=5.0):
        samples = [None]

        def settled():  # two samples in a row agree
            samples.append(thread_and_fd_count(pid))
            return samples[-1] == samples[-2]

        wait_for(settled, timeout, step=0.1)
        self.pid = pid
        self.threads, self.fds = samples[-1]
        self.tids = set(os.listdir("/proc/%d/task" % pid))
        self.busy = set()
        for _ in range(3):  # samples spread in time, not a wait
            self.busy |= _busy_threads(pid)
            time.sleep(0.05)


def _in_timed_wait(pid, tid):
    """True if thread TID sleeps in a futex wait that has a timeout, or is gone.

    That is how the daemon's own helper threads wait (the accept loop's
    timed select aside); a thread blocked on a socket, or on a lock with no
    timeout, does not look like this.
    """
    try:
        with open("/proc/%d/task/%s/syscall" % (pid, tid)) as f:
            fields = f.read().split()
    except OSError:
        return True
    return (_FUTEX is not None and len(fields) > 4 and fields[0] == str(_FUTEX)
            and int(fields[4], 16) != 0)


def _busy_threads(pid):
    return {t for t in os.listdir("/proc/%d/task" % pid) if not _in_timed_wait(pid, t)}


def assert_no_leak(pid, base, what, timeout=10.0):
    """Descriptors and the thread count back to BASE exactly.

    Every thread that is busy now must have been busy at BASE (so no relay
    is left blocked on a socket), and no thread may have been added: each
    connection's threads end with it.  With SPIPED_HEAVY=1 the deadline
    grows to 60 s.
    """
    def back():
        nonlocal threads, fds, busy
        threads, fds = thread_and_fd_count(pid)
        busy = sorted(_busy_threads(pid) - base.busy)
        threads_ok = not busy and threads <= base.threads
        return fds == base.fds and threads_ok

    threads = fds = busy = None
    if wait_for(back, 60.0 if HEAVY else timeout, step=0.05):
        return
    detail = []
    for tid in busy[:5]:
        try:
            with open("/proc/%d/task/%s/wchan" % (pid, tid)) as f:
                detail.append("thread %s waits in %s" % (tid, f.read()))
        except OSError:
            pass
    raise AssertionError("%s: %d fds (was %d), %d threads (was %d), %d busy that were not %s"
                         % (what, fds, base.fds, threads, base.threads, len(busy),
                            "; ".join(detail)))


def serve_good_d(addr, key, recorder, size=5000):
    """A valid client through -d: its plaintext must reach RECORDER intact."""
    data = os.urandom(size)
    with connect(addr, timeout=10) as s:
        keys = client_handshake(s, key)
        s.sendall(seal_stream(keys.up, data))
        s.shutdown(socket.SHUT_WR)
        got, how = drain(s)
    assert (got, how) == (b"", "eof")
    assert wait_for(lambda: data in recorder.records, 10), "good client's data never arrived"


def good_exchange(addr, size=100000):
    check_echo(addr, os.urandom(size), timeout=20)


# ---------------------------------------------------------------------------
# 1. Hostile peers on the encrypted side
# ---------------------------------------------------------------------------


def _garbage(rng):
    return rng.randbytes(rng.choice([0, rng.randint(1, 64), rng.randint(1, 4096)]))


def _ends(sock, half_closed):
    """Drain SOCK: (bytes, outcome, why not acceptable or None).

    Without our half-close the daemon must drop us within DROP_WITHIN:
    only detecting the cheat can end the connection that fast.
    """
    started = time.monotonic()
    got, how = drain(sock)
    elapsed = time.monotonic() - started
    if how not in ("eof", "reset"):
        return got, how, "connection not closed (%s) within %.0fs" % (how, CASE_TIMEOUT)
    if not half_closed and elapsed > DROP_WITHIN:
        return got, how, "dropped only after %.1fs" % elapsed
    return got, how, None


def _stream_case(sock, rng, kind, keys, other, foreign, sent_back):
    """Send a mutated stream of KIND sealed with KEYS on SOCK (see hostile_stream).

    Returns (the plaintext a correct receiver delivers, why the outcome is
    not acceptable or None); SENT_BACK says it when bytes came back.
    """
    wire = hostile_stream(rng, kind, keys, other, foreign)
    expected, must_drop = reference_open(keys, wire)
    assert must_drop or kind in MAY_BE_VALID, "fuzzer made a valid %s stream" % kind
    send_quietly(sock, wire, half_close=not must_drop)
    got, how, bad = _ends(sock, not must_drop)
    if got:
        bad = sent_back % len(got)
    return expected, bad


def _d_case(port, key, index, foreign):
    """One hostile client of -d; (kind, expected plaintext at the target, keys, error)."""
    rng = random.Random("%d:d:%d" % (FUZZ_SEED, index))
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    expected, keys = b"", None
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kind == "garbage":
            junk = _garbage(rng)
            half = len(junk) < 32 + 288  # shorter than a handshake: EOF ends it
            send_quietly(s, junk, half)
            got, how, bad = _ends(s, half)
            if len(got) > 32:
                bad = "the daemon sent %d bytes (more than its nonce)" % len(got)
        elif kind in HANDSHAKE_KINDS:
            nonce = os.urandom(32)
            s.sendall(nonce)
            theirs = recv_exact(s, 32)
            half = kind == "hs_truncate"
            send_quietly(s, hostile_hello(rng, kind, key, nonce, theirs, client=True), half)
            got, how, bad = _ends(s, half)
            if got:
                bad = "the daemon answered a bad DH message with %d bytes" % len(got)
        else:
            keys = client_handshake(s, key)
            expected, bad = _stream_case(s, rng, kind, keys.up, keys.down, foreign or keys.down,
                                         "the daemon sent %d bytes back")
    error = bad and "case %d (%s): %s" % (index, kind, bad)
    return kind, expected, keys, error


def _e_case(conn, key, index, foreign, clients_expected):
    """One hostile server behind -e: the accepted connection CONN; returns an error or None."""
    rng = random.Random("%d:e:%d" % (FUZZ_SEED, index))
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    conn.settimeout(CASE_TIMEOUT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls
    expected = b""
    with conn:
        try:
            if kind == "garbage":
                junk = _garbage(rng)
                half = len(junk) < 32 + 288
                send_quietly(conn, junk, half)
                got, how, bad = _ends(conn, half)
                if len(got) > 32 + 288:
                    bad = "-e sent %d bytes to a garbage server" % len(got)
            else:
                nonce = os.urandom(32)
                conn.sendall(nonce)
                nonce_c = recv_exact(conn, 32)
                hello_c = recv_exact(conn, 288)
                dk = kdf(key, nonce_c + nonce, 64)
                assert hmac.compare_digest(mac(dk[:32], hello_c[:256]), hello_c[256:])
                if kind in HANDSHAKE_KINDS:
                    half = kind == "hs_truncate"
                    send_quietly(conn, hostile_hello(rng, kind, key, nonce, nonce_c, client=False),
                                 half)
                    got, how, bad = _ends(conn, half)
                    if got:
                        bad = "-e answered a bad DH message with %d bytes" % len(got)
                else:
                    conn.sendall(ONE + mac(dk[32:], ONE))
                    keys = Keys(key, nonce_c, nonce)
                    foreign[0], foreign[1] = foreign[1], keys.up
                    expected, bad = _stream_case(conn, rng, kind, keys.down, keys.up,
                                                 foreign[0] or keys.up,
                                                 "-e sent %d bytes (its client sends nothing)")
        except (OSError, EOFError, AssertionError) as e:
            bad = "handshake with -e failed: %r" % (e,)
    clients_expected.append((expected, "case %d (%s)" % (index, kind)))
    return bad and "case %d (%s): %s" % (index, kind, bad)


def _run_fuzz_threads(work, cases):
    """Run WORK in FUZZ_THREADS threads, each joined with time for CASES cases.

    Returns (seconds taken, whether any thread still runs).
    """
    started = time.monotonic()
    threads = [threading.Thread(target=work, daemon=True) for _ in range(FUZZ_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CASE_TIMEOUT * 3 + cases)
    return time.monotonic() - started, any(t.is_alive() for t in threads)


def _fuzz_report(errors, extra=()):
    lines = list(errors[:15]) + list(extra)
    return ("seed %d (SPIPED_FUZZ_SEED=%d reproduces): %d failures\n  %s"
            % (FUZZ_SEED, FUZZ_SEED, len(errors) + len(extra), "\n  ".join(lines)))


def _compare_deliveries(expected, delivered, what, exact):
    """EXPECTED: (authentic plaintext, case label) pairs; DELIVERED: what arrived.

    Every non-empty delivery must be a prefix of a distinct authentic
    plaintext (nothing unauthenticated, nothing out of order); with EXACT,
    each authentic plaintext must also have arrived whole.  C may lose the
    tail of the authentic part when it drops a connection (its pending
    writes are cancelled), so only the prefix rule holds for C; ours
    writes the authentic part before it drops the connection.
    """
    pool = collections.defaultdict(list)   # first 16 bytes -> [(plaintext, label)]
    for x, label in expected:
        if x:
            pool[x[:16]].append((x, label))
    lines = []
    for got in sorted((x for x in delivered if x), key=len, reverse=True):
        if len(got) >= 16:
            candidates = pool.get(got[:16], [])
        else:
            candidates = [item for group in pool.values() for item in group]
        match = next((item for item in candidates if item[0].startswith(got)), None)
        if match is None:
            lines.append("%s received %d bytes nobody authenticated: %r..."
                         % (what, len(got), got[:40]))
            continue
        pool[match[0][:16]].remove(match)
        if exact and match[0] != got:
            lines.append("%s: %s received only %d of %d authentic bytes"
                         % (match[1], what, len(got), len(match[0])))
    if exact:
        lines += ["%s: %s never received its %d authentic bytes" % (label, what, len(x))
                  for group in pool.values() for x, label in group]
    return lines


@pytest.mark.timeout(900 if HEAVY else 150)
@pytest.mark.parametrize("impl", ["ours", pytest.param("c", marks=need_c)])
def test_fuzz_hostile_client_of_decrypter(procs, keyfile, impl):
    """Hostile clients of -d: each is dropped, only authentic data reaches the target.

    C -d gets a tenth of the cases: it checks the reference receiver above.
    """
    cases = FUZZ_CASES - FUZZ_CASES // 5
    if impl == "c":
        cases //= 10
    key = key_of(keyfile)
    recorder = Recorder()
    port = free_port()
    d = procs.spiped("-d", recorder.addr, keyfile, "-f", "-n", "0", "-o", HANDSHAKE_O,
                     source=tcp_addr(port), impl=impl)
    serve_good_d(tcp_addr(port), key, recorder)
    assert wait_for(recorder.idle, 5)
    baseline = Baseline(d.pid)
    recorder.records.clear()

    lock = threading.Lock()
    todo = iter(range(cases))
    errors, expected, kinds = [], [], collections.Counter()

    def worker():
        foreign = None
        while True:
            with lock:
                index = next(todo, None) if len(errors) < 20 else None
            if index is None:
                return
            try:
                kind, want, keys, error = _d_case(port, key, index, foreign)
            except Exception as e:  # the case could not even run: report it
                kind, want, keys, error = "?", b"", None, "case %d: %r" % (index, e)
            if keys is not None:
                foreign = keys.up
            with lock:
                kinds[kind] += 1
                expected.append((want, "case %d (%s)" % (index, kind)))
                if error:
                    errors.append(error)

    elapsed, hung = _run_fuzz_threads(worker, cases)
    assert not hung, _fuzz_report(errors, ["fuzz threads hung"])
    assert d.poll() is None, "the daemon died: %s" % d.log_text()
    assert not errors, _fuzz_report(errors)
    assert_no_leak(d.pid, baseline, "-d after %d hostile clients" % cases)
    assert wait_for(recorder.idle, 20), "target connections still open"
    mismatches = _compare_deliveries(expected, recorder.records, "the target", impl == "ours")
    assert not mismatches, _fuzz_report([], mismatches)
    assert set(kinds) >= set(KINDS) or cases < 1000, kinds
    serve_good_d(tcp_addr(port), key, recorder)
    print("fuzzed -d with %d cases in %.1fs (seed %d)" % (cases, elapsed, FUZZ_SEED))


@pytest.mark.timeout(600 if HEAVY else 120)
@pytest.mark.parametrize("impl", ["ours", pytest.param("c", marks=need_c)])
def test_fuzz_hostile_server_behind_encrypter(procs, keyfile, impl):
    """A hostile server behind -e: -e drops it and forwards only authentic data.

    C -e gets a tenth of the cases: it checks the reference receiver above.
    """
    cases = FUZZ_CASES // 5
    if impl == "c":
        cases //= 10
    key = key_of(keyfile)
    lock = threading.Lock()
    errors, expected, delivered = [], [], []
    accepted = [0]
    good_mode = [True]
    foreign = [None, None]
    good_data = os.urandom(3000)

    def good_server(conn):
        with conn:
            conn.settimeout(10)
            nonce = os.urandom(32)
            conn.sendall(nonce)
            nonce_c = recv_exact(conn, 32)
            recv_exact(conn, 288)
            dk = kdf(key, nonce_c + nonce, 64)
            conn.sendall(ONE + mac(dk[32:], ONE))
            conn.sendall(seal_stream(Keys(key, nonce_c, nonce).down, good_data))
            conn.shutdown(socket.SHUT_WR)
            drain(conn)

    def _e_run(conn, index):
        try:
            error = _e_case(conn, key, index, foreign, expected)
        except Exception as e:
            error = "case %d: %r" % (index, e)
        if error:
            with lock:
                errors.append(error)

    class Servers(TargetServer):
        """A good server while good_mode[0] holds, else the next hostile case."""

        backlog = 1024

        def on_accept(self, conn):
            if good_mode[0]:
                return (None,)
            with lock:
                index = accepted[0]
                accepted[0] += 1
            return (index,)

        def handle(self, conn, index):
            if index is None:
                good_server(conn)
            else:
                _e_run(conn, index)

    servers = Servers()
    port = free_port()
    e = procs.spiped("-e", servers.addr, keyfile, "-f", "-n", "0", "-o", HANDSHAKE_O,
                     source=tcp_addr(port), impl=impl)

    def good_client():
        good_mode[0] = True
        with connect(tcp_addr(port), timeout=10) as s:
            got, how = drain(s)
        assert (sha(got), how) == (sha(good_data), "eof")

    try:
        good_client()
        baseline = Baseline(e.pid)
        good_mode[0] = False
        todo = iter(range(cases))
        made = [0]

        def client():
            while True:
                with lock:
                    if len(errors) >= 20 or next(todo, None) is None:
                        return
                    made[0] += 1
                try:
                    with connect(tcp_addr(port), timeout=CASE_TIMEOUT) as s:
                        got, how = drain(s)
                except OSError as e:
                    got, how = b"", repr(e)
                with lock:
                    delivered.append(got)
                    if how not in ("eof", "reset"):
                        errors.append("client of -e: connection not closed: %s" % how)

        elapsed, hung = _run_fuzz_threads(client, cases)
        assert not hung, _fuzz_report(errors, ["clients hung"])
        assert wait_for(lambda: len(expected) >= accepted[0] == made[0], 20), \
            _fuzz_report(errors, ["-e dialled %d times for %d clients; %d cases ended"
                                  % (accepted[0], made[0], len(expected))])
        assert e.poll() is None, "the daemon died: %s" % e.log_text()
        mismatches = _compare_deliveries(expected, delivered, "a client of -e", impl == "ours")
        assert not errors and not mismatches, _fuzz_report(errors, mismatches)
        assert_no_leak(e.pid, baseline, "-e after %d hostile servers" % cases)
        good_client()
        print("fuzzed -e with %d cases in %.1fs (seed %d)" % (cases, elapsed, FUZZ_SEED))
    finally:
        servers.close()


# ---------------------------------------------------------------------------
# 2. Stalled and slow clients
# ---------------------------------------------------------------------------


def _open_stalled(addr, count, budget=0.8):
    """Open up to COUNT connections within BUDGET seconds; half send one byte.

    Connects are made one after another, each given 50 ms: once -n is
    reached the kernel backlog (10) fills and further SYNs are dropped, so
    those attempts are abandoned (closed) and only what got in stalls.
    """
    host, port = addr.rsplit(":", 1)
    sockaddr = (host.strip("[]"), int(port))
    established = []
    deadline = time.monotonic() + budget
    sel = selectors.DefaultSelector()
    while len(established) < count and time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(sockaddr)
        sel.register(s, selectors.EVENT_WRITE)
        ready = sel.select(0.05)
        sel.unregister(s)
        if ready and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            established.append(s)
        else:
            s.close()
    sel.close()
    for i, s in enumerate(established):
        s.setblocking(True)
        s.settimeout(10)
        if i % 2:
            s.send(b"\x01")  # one byte, then nothing
    return established


def _good_client_retrying(addr, key, recorder, deadline):
    """A valid client of -d that keeps reconnecting while the backlog is full."""
    host, port = addr.rsplit(":", 1)
    data = os.urandom(2000)
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.2)
        try:
            s.connect((host.strip("[]"), int(port)))
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise AssertionError("the good client could not even connect")
    with s:
        s.settimeout(10)
        keys = client_handshake(s, key)
        s.sendall(seal_stream(keys.up, data))
        s.shutdown(socket.SHUT_WR)
        drain(s)
    assert wait_for(lambda: data in recorder.records, 5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["ours", pytest.param("c", marks=need_c)])
@pytest.mark.parametrize("limit", ["10", "0"])
def test_stalled_clients_do_not_block_a_good_one(procs, keyfile, limit, impl):
    """200 clients that send nothing (or one byte): -o 1 frees their slots in time."""
    key = key_of(keyfile)
    recorder = Recorder()
    addr = tcp_addr(free_port())
    d = procs.spiped("-d", recorder.addr, keyfile, "-f", "-n", limit, "-o", "1", source=addr,
                     impl=impl)
    serve_good_d(addr, key, recorder)
    assert wait_for(recorder.idle, 5)
    baseline = Baseline(d.pid)
    stalled = _open_stalled(addr, 200)
    try:
        # -n 0: all are accepted at once; -n 10: 10 live plus a full backlog.
        assert len(stalled) >= (100 if limit == "0" else 11), len(stalled)
        started = time.monotonic()
        _good_client_retrying(addr, key, recorder, started + 10)
        elapsed = time.monotonic() - started
        if limit == "0":
            assert elapsed < 1.0, "good client waited %.2fs with -n 0" % elapsed
        else:
            # Each -o period frees 10 slots; at most ~21 stalled clients got in.
            assert elapsed < 3.0, "good client waited %.2fs behind %d stalled clients" \
                % (elapsed, len(stalled))
        print("%d stalled clients; good client served after %.2fs" % (len(stalled), elapsed))
        # The stalled clients were dropped: each sees EOF or a reset, never data.
        for s in stalled:
            got, how = drain(s)
            assert len(got) <= 32 and how in ("eof", "reset"), (len(got), how)
    finally:
        for s in stalled:
            s.close()
    assert d.poll() is None
    assert_no_leak(d.pid, baseline, "-d after stalled clients")
    assert wait_for(recorder.idle, 10)
    leaked = [r for r in recorder.records if r and len(r) != 2000 and len(r) != 5000]
    assert not leaked, "the target received bytes from stalled clients: %r" % leaked[:3]
    serve_good_d(addr, key, recorder)


# ---------------------------------------------------------------------------
# 3. Back-pressure
# ---------------------------------------------------------------------------


class RssSampler:
    """Samples VmRSS of some PIDs every 50 ms; .peak[pid] in KiB."""

    def __init__(self, pids):
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], rss_kib(pid))
                except OSError:
                    pass
            self.stop.wait(0.05)

    def finish(self):
        self.stop.set()
        self.thread.join(5)
        return self.peak


def _slow_read(sock, size, digest, deadline):
    """Read SIZE bytes, 64 KiB every 5 ms; returns the count read."""
    seen = 0
    while seen < size and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        digest.update(chunk)
        seen += len(chunk)
        time.sleep(0.005)  # the slow reader is what is tested
    return seen


@pytest.mark.timeout(120)
@pytest.mark.parametrize("direction", ["to_target", "to_client"])
def test_backpressure_bounds_memory(procs, keyfile, direction):
    """64 MiB towards a slow reader: no daemon buffers it (VmRSS < 100 MiB); all bytes arrive."""
    size = (256 if HEAVY else 64) * MiB
    data = random.Random(size).randbytes(size)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(10)
    e, d = procs.chain(tcp_addr(listener.getsockname()[1]), keyfile)
    sampler = RssSampler([d.pid, e.pid])
    digest = hashlib.sha256()
    deadline = time.monotonic() + 60
    errors = []
    try:
        client = connect(e.addr, timeout=20)
        target, _ = listener.accept()
        target.settimeout(20)
        sender, reader = (client, target) if direction == "to_target" else (target, client)

        def send():
            try:
                sender.sendall(data)
                sender.shutdown(socket.SHUT_WR)
            except OSError as err:
                errors.append(err)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        started = time.monotonic()
        seen = _slow_read(reader, size, digest, deadline)
        elapsed = time.monotonic() - started
        t.join(10)
        client.close()
        target.close()
    finally:
        peak = sampler.finish()
        listener.close()
    assert not errors, errors
    assert seen == size and digest.hexdigest() == sha(data), \
        "%d of %d bytes arrived (%.1fs); intact: %s" % (seen, size, elapsed,
                                                       digest.hexdigest() == sha(data))
    for name, p in (("-d", d), ("-e", e)):
        assert peak[p.pid] < 100 * 1024, "%s peaked at %d KiB VmRSS" % (name, peak[p.pid])
    print("%d MiB %s in %.1fs; peak VmRSS -d %d KiB, -e %d KiB"
          % (size // MiB, direction, elapsed, peak[d.pid], peak[e.pid]))


# ---------------------------------------------------------------------------
# 4. Faults mid-stream
# ---------------------------------------------------------------------------


class Transfer:
    """A client sending SIZE bytes in paced chunks while reading the echo.

    .outcome: 'complete' (all echoed, then EOF), 'eof', 'reset' or
    'timeout'; finish() checks that what came back is a prefix of what was
    sent.  Both threads poll a stop flag, so reset() can really reset (a
    socket that another thread is blocked on is not released by close()).
    """

    def __init__(self, addr, size=4 * MiB, chunk=32768, pause=0.002, timeout=CASE_TIMEOUT,
                 gate=None):
        """GATE: an Event; if given, only the first chunk is sent until it is set."""
        self.data = os.urandom(size)
        self.gate = gate
        self.sock = connect(addr, timeout=timeout)
        self.sock.settimeout(0.1)
        self.deadline = time.monotonic() + timeout + size / MiB
        self.chunk, self.pause = chunk, pause
        self.stop = threading.Event()
        self.sent = 0
        self.received = bytearray()
        self.outcome = None
        self.send_error = None
        self.ended_at = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader.start()
        self.writer.start()

    def _running(self):
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def _write(self):
        view = memoryview(self.data)
        try:
            while self.sent < len(self.data) and self._running():
                end = min(self.sent + self.chunk, len(self.data))
                while self.sent < end and self._running():
                    try:
                        self.sent += self.sock.send(view[self.sent:end])
                    except socket.timeout:
                        pass
                while self.gate is not None and not self.gate.wait(0.1) and self._running():
                    pass
                time.sleep(self.pause)  # pacing: keeps the transfer long, not a wait
            if self.sent == len(self.data):
                self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.send_error = e

    def _read(self):
        how = "timeout"
        while self._running() and len(self.received) <= len(self.data):
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                how = "reset"
                break
            if not chunk:
                how = "eof"
                break
            self.received += chunk
        if self.stop.is_set():
            how = "stopped"
        if how == "eof" and bytes(self.received) == self.data:
            how = "complete"
        self.ended_at = time.monotonic()
        self.outcome = how

    def wait_received(self, amount, timeout=10):
        return wait_for(lambda: len(self.received) >= amount or self.outcome, timeout)

    def finish(self, timeout=CASE_TIMEOUT + 5):
        self.reader.join(timeout)
        self.writer.join(timeout)
        self.sock.close()
        assert self.data.startswith(bytes(self.received)), "echoed bytes were corrupted"
        return self.outcome

    def reset(self):
        """Abort with an RST (SO_LINGER 0, then close)."""
        self.stop.set()
        self.reader.join(5)
        self.writer.join(5)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def _blackhole():
    """A listener with backlog 0 that never accepts, filled so that connects hang."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.3)
        try:
            s.connect(lst.getsockname())
        except OSError:
            s.close()
            return lst, fillers
        fillers.append(s)
    raise AssertionError("could not fill a backlog-0 listener")


class Pair:
    """ours -e -> (ours or C) -d -> target, with baselines for leak checks."""

    def __init__(self, procs, keyfile, target, d_impl="ours", e_impl="ours",
                 d_extra=(), e_extra=(), d_addr=None, env=None):
        """D_ADDR: where -e connects; -d is started there later if given.
        ENV: both daemons' environment (default: the test's)."""
        self.procs, self.keyfile = procs, keyfile
        self.env = env
        self.d_addr = d_addr or tcp_addr(free_port())
        self.e_addr = tcp_addr(free_port())
        self.target, self.d_impl, self.e_impl = target, d_impl, e_impl
        self.d_extra, self.e_extra = d_extra, e_extra
        self.d = None
        if d_addr is None:
            self.start_d()
        self.start_e()
        self.baselines = {}

    def start_d(self):
        self.d = self.procs.spiped("-d", self.target, self.keyfile, *self.d_extra,
                                   source=self.d_addr, impl=self.d_impl, env=self.env)

    def start_e(self):
        self.e = self.procs.spiped("-e", self.d_addr, self.keyfile, *self.e_extra,
                                   source=self.e_addr, impl=self.e_impl, env=self.env)

    def ours(self):
        return [(n, p) for n, p, impl in (("-d", self.d, self.d_impl), ("-e", self.e, self.e_impl))
                if impl == "ours" and p is not None]

    def snapshot(self, warm_up=True):
        """Record the baselines, after one good exchange unless WARM_UP is false."""
        if warm_up:
            good_exchange(self.e_addr)
        for name, p in self.ours():
            self.baselines[name] = Baseline(p.pid)

    def check_recovered(self, what):
        """Both alive, no thread or fd leaked, a good client is served."""
        for name, p in self.ours():
            assert p.poll() is None, "%s died after %s: %s" % (name, what, p.log_text())
        for name, p in self.ours():
            if name in self.baselines:
                assert_no_leak(p.pid, self.baselines[name], "%s after %s" % (name, what))
        good_exchange(self.e_addr)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plan", ["close_early", "reset"])
def test_target_fails_mid_stream(procs, keyfile, plan):
    """The target closes (or resets) during a transfer: the client sees the end, no hang."""
    target = FaultTarget(["echo", plan])  # the first one is the warm-up
    pair = Pair(procs, keyfile, target.addr)
    try:
        pair.snapshot()
        started = time.monotonic()
        t = Transfer(pair.e_addr)
        outcome = t.finish()
        assert outcome in ("eof", "reset"), "client after the target's %s: %s" % (plan, outcome)
        assert t.ended_at - started < 5
        assert wait_for(lambda: len(target.ended) == 2, 5)
        assert (plan, plan) in [e[:2] for e in target.ended], target.ended
        pair.check_recovered("the target's %s" % plan)
    finally:
        target.close()


@pytest.mark.timeout(60)
def test_client_resets_mid_stream(procs, keyfile):
    """The plaintext client resets during a transfer: the target's connection ends too."""
    target = FaultTarget()
    pair = Pair(procs, keyfile, target.addr)
    try:
        pair.snapshot()
        t = Transfer(pair.e_addr, pause=0.01)
        assert t.wait_received(256 * 1024) and t.outcome is None
        t.reset()
        assert wait_for(lambda: target.ended, 3), "the target's connection hangs"
        assert target.ended[0][1] in ("eof", "reset"), target.ended
        pair.check_recovered("a client reset")
    finally:
        target.close()


@need_c
@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", ["d", "e"])
def test_c_peer_killed_mid_stream(procs, keyfile, victim):
    """SIGKILL the C end of a C/ours pair during a transfer: ours drops the connection."""
    target = FaultTarget()
    pair = Pair(procs, keyfile, target.addr,
                d_impl="c" if victim == "d" else "ours", e_impl="c" if victim == "e" else "ours")
    try:
        pair.snapshot()
        t = Transfer(pair.e_addr, pause=0.01)
        assert t.wait_received(256 * 1024) and t.outcome is None
        c = pair.d if victim == "d" else pair.e
        c.kill()
        c.wait(5)
        killed = time.monotonic()
        if victim == "d":
            # ours -e relays for the client: the client must see the end.
            t.finish()
            assert t.outcome in ("eof", "reset") and t.ended_at - killed < 5, t.outcome
        else:
            # ours -d relays for the target: the target must see the end.
            assert wait_for(lambda: target.ended, 5), "the target's connection hangs"
            assert target.ended[0][1] in ("eof", "reset"), target.ended
            t.finish()
        (pair.start_d if victim == "d" else pair.start_e)()
        pair.check_recovered("SIGKILL of C -%s" % victim)
    finally:
        target.close()


def _pair_with_bad_target(procs, keyfile, where, bad_addr, extra=()):
    """where='e': ours -e -> BAD_ADDR (-d is started there afterwards);
    where='d': ours -e -> ours -d -> BAD_ADDR (echo started there afterwards)."""
    if where == "e":
        return Pair(procs, keyfile, tcp_addr(free_port()), d_addr=bad_addr,
                    e_extra=extra)
    return Pair(procs, keyfile, bad_addr, d_extra=extra)


def _repair(pair, where, bad_addr):
    """Make BAD_ADDR work: start -d there, or an echo target; returns the echo."""
    if where == "e":
        target = EchoServer(pair.target)
        pair.start_d()
        return target
    return EchoServer(bad_addr)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["e", "d"])
def test_target_refuses(procs, keyfile, where):
    """Nothing listens at the target (of -e, or of -d): the client sees the end at once."""
    bad_addr = tcp_addr(free_port())
    pair = _pair_with_bad_target(procs, keyfile, where, bad_addr)
    for attempt in range(4):
        if attempt == 1:  # the first one started whatever threads a daemon keeps
            pair.snapshot(warm_up=False)
        started = time.monotonic()
        with connect(pair.e_addr, timeout=CASE_TIMEOUT) as s:
            send_quietly(s, b"hello")
            got, how = drain(s)
        assert (got, how in ("eof", "reset")) == (b"", True), (got, how)
        assert time.monotonic() - started < 2.0
    target = _repair(pair, where, bad_addr)
    try:
        pair.check_recovered("refused connections")
    finally:
        target.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["e", "d"])
def test_target_never_accepts(procs, keyfile, where):
    """The target's backlog is full so connect() hangs: -o 1 drops the client in time."""
    hole, fillers = _blackhole()
    bad_addr = tcp_addr(hole.getsockname()[1])
    try:
        pair = _pair_with_bad_target(procs, keyfile, where, bad_addr, ("-o", "1"))
        for attempt in range(2):
            if attempt == 1:
                pair.snapshot(warm_up=False)
            started = time.monotonic()
            with connect(pair.e_addr, timeout=CASE_TIMEOUT) as s:
                send_quietly(s, b"hello")
                got, how = drain(s)
            elapsed = time.monotonic() - started
            assert (got, how in ("eof", "reset")) == (b"", True), (got, how)
            assert 0.8 <= elapsed < 3.0, "dropped after %.2fs with -o 1" % elapsed
    finally:
        for s in fillers:
            s.close()
        hole.close()
    target = _repair(pair, where, bad_addr)
    try:
        pair.check_recovered("a target that never accepts")
    finally:
        target.close()


# ---------------------------------------------------------------------------
# 5. Descriptor exhaustion
# ---------------------------------------------------------------------------

ACCEPT_ERROR = "Error accepting connection: Too many open files"


def _low_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runs_out_at", ["accept", "dial"])
def test_descriptor_exhaustion(procs, keyfile, runs_out_at):
    """More clients than descriptors: no spinning, no death, one log line, recovery.

    ours -e starts with RLIMIT_NOFILE 40; the limit is then set (prlimit) so
    that the last free descriptor runs out either at accept() or at the
    socket() for the target.  Each live connection holds two descriptors.
    """
    echo = EchoServer()
    d = procs.spiped("-d", echo.addr, keyfile, "-n", "0")
    e = procs.spiped("-e", d.addr, keyfile, "-n", "0", "--log-connections", preexec_fn=_low_nofile)
    holders, extra = [], []
    try:
        good_exchange(e.addr)
        baseline = Baseline(e.pid)
        spare = 40 - baseline.fds - (1 if runs_out_at == "dial" else 0)
        slots = spare // 2
        limit = baseline.fds + 2 * slots + (1 if runs_out_at == "dial" else 0)
        resource.prlimit(e.pid, resource.RLIMIT_NOFILE, (limit, limit))
        for i in range(slots):
            s = connect(e.addr, timeout=10)
            s.sendall(b"%d" % i)
            assert s.recv(100) == b"%d" % i, "holder %d not served" % i
            holders.append(s)
        assert thread_and_fd_count(e.pid)[1] == baseline.fds + 2 * slots
        for i in range(6):
            s = connect(e.addr, timeout=10)
            s.sendall(b"x%d" % i)
            extra.append(s)
        # Wait until the daemon has run into the limit: the accept error is
        # logged, or (dial) every extra client has had its target refused.
        failed = "connect to %s failed: Too many open files" % d.addr
        if runs_out_at == "accept":
            ran_out = lambda: ACCEPT_ERROR in e.log_text()
        else:
            ran_out = lambda: e.log_text().count(failed) >= len(extra)
        assert wait_for(ran_out, 10), "never ran out of descriptors: %s" % e.log_text()
        cpu_before = cpu_seconds(e.pid)
        logged_before = e.log_text().count(ACCEPT_ERROR)
        # Once when it runs out, not once per retry.  Where each extra client
        # is accepted and dropped, the descriptor it briefly held can make
        # the next accept() fail too: at most once per client then.
        if runs_out_at == "accept":
            assert logged_before == 1, e.log_text()
        else:
            assert logged_before <= len(extra), e.log_text()
        # What is tested: for 2 s while saturated no new lines, and no spinning.
        assert_stays(lambda: e.log_text().count(ACCEPT_ERROR) == logged_before, 2.0,
                     what=lambda: "%d more lines %r while saturated"
                     % (e.log_text().count(ACCEPT_ERROR) - logged_before, ACCEPT_ERROR))
        cpu = cpu_seconds(e.pid) - cpu_before
        assert e.poll() is None, "died: %s" % e.log_text()
        assert cpu < 0.5, "-e used %.2fs of CPU in 2s while out of descriptors" % cpu
        if runs_out_at == "accept":  # not accepted, so nothing comes, not even the end
            assert_stays(lambda: all(quiet(s) for s in extra), 0.2,
                         what="a client beyond the limit got an answer")
        else:
            for s in extra:
                s.settimeout(5)
                try:
                    got = s.recv(100)
                except socket.timeout:
                    got = None
                except OSError:
                    got = b""
                assert got == b"", "a client that could not be dialled got %r" % got
        for s in holders:
            s.close()
        if runs_out_at == "accept":
            # Once descriptors are free each waiting client is accepted: it is
            # served, or dropped if a descriptor ran out again between its
            # accept() and the socket() for its target (freed descriptors come
            # back one at a time).  None may be left hanging.
            for i, s in enumerate(extra):
                s.settimeout(10)
                try:
                    got = s.recv(100)
                except socket.timeout:
                    raise AssertionError("waiting client %d neither served nor dropped" % i)
                except OSError:
                    got = b""
                assert got in (b"x%d" % i, b""), got
        for s in extra:
            s.close()
        # Descriptors come back as those connections finish tearing down.
        assert_no_leak(e.pid, baseline, "-e after descriptor exhaustion")
        good_exchange(e.addr)
    finally:
        for s in holders + extra:
            s.close()
        echo.close()
    # Freeing descriptors one connection at a time may start a new episode
    # per waiting client, no more.
    log = e.log_text()
    complaints = log.count(ACCEPT_ERROR)
    assert complaints <= 1 + len(extra), "%r logged %d times" % (ACCEPT_ERROR, complaints)
    if runs_out_at == "dial":
        assert log.count(failed) >= len(extra), log


# ---------------------------------------------------------------------------
# 6. Graceful shutdown under load
# ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["d", "e"])
def test_sigterm_lets_live_transfers_finish(procs, keyfile, tmp_path, victim):
    """SIGTERM during 20 2 MiB echo transfers: all complete intact, then exit 0.

    Each transfer sends its first chunk, sees it echoed, and holds the rest
    until the daemon has announced its drain (STOPPING=1 on the notify
    socket): so every transfer is live at the signal and carries almost all
    of its data after the daemon began shutting down, however slow the
    machine.
    """
    count, size = (40, 4 * MiB) if HEAVY else (20, 2 * MiB)
    chunk = 65536
    echo = EchoServer()
    notify = Notify(str(tmp_path / "notify"))
    notify.follow()
    env = clean_env(NOTIFY_SOCKET=notify.env)
    pair = Pair(procs, keyfile, echo.addr, d_extra=("-n", "0"), e_extra=("-n", "0"),
                env=env)
    gate = threading.Event()
    try:
        transfers = [Transfer(pair.e_addr, size=size, chunk=chunk, pause=0.03, timeout=60,
                              gate=gate)
                     for _ in range(count)]
        assert all(t.wait_received(chunk, timeout=30) for t in transfers)
        held = [t.outcome is None and t.sent == chunk and len(t.received) == chunk
                for t in transfers]
        assert all(held), "%d of %d transfers held at the gate" % (sum(held), count)
        daemon = pair.d if victim == "d" else pair.e
        daemon.send_signal(signal.SIGTERM)
        notify.wait_for_text("STOPPING=1", timeout=30)
        assert daemon.poll() is None, "exited with %d live connections" % count
        gate.set()
        outcomes = [t.finish(timeout=60) for t in transfers]
        last = max(t.ended_at for t in transfers)
        assert outcomes == ["complete"] * count, collections.Counter(outcomes)
        assert all(bytes(t.received) == t.data for t in transfers)
        status = daemon.wait(10)
        exited = time.monotonic()
        assert status == 0, "exit status %s after SIGTERM: %s" % (status, daemon.log_text())
        assert exited - last < 3.0, "exited %.1fs after the last transfer" % (exited - last)
    finally:
        gate.set()
        echo.close()
        notify.close()


# ---------------------------------------------------------------------------
# 7. Secrets
# ---------------------------------------------------------------------------


def _needles(raw):
    k = hashlib.sha256(raw).digest()
    found = {}
    for name, value in (("key", raw), ("K", k)):
        found[name + " raw"] = value
        found[name + " hex"] = value.hex().encode()
        found[name + " HEX"] = value.hex().upper().encode()
        found[name + " base64"] = base64.b64encode(value)
    found["key text"] = raw[24:]
    return found


@pytest.mark.timeout(90)
def test_key_material_never_logged(procs, tmp_path):
    """Wrong keys, garbage, refused targets, SIGUSR1, SIGTERM and a start-up
    error with --log-connections: no form of the key or of K appears."""
    key = os.urandom(24) + b"passphrase-" + os.urandom(12).hex().encode()
    other = os.urandom(24) + b"passphrase-" + os.urandom(12).hex().encode()
    keyfile, otherfile = tmp_path / "key", tmp_path / "otherkey"
    write_key(keyfile, key)
    write_key(otherfile, other)
    before = os.stat(keyfile)
    echo = EchoServer()
    closed = tcp_addr(free_port())
    logf = ["--log-connections"]
    d_addr, e_addr, wrong_addr, refused_e, refused_d = (tcp_addr(free_port()) for _ in range(5))
    try:
        daemons = [
            procs.spiped("-d", echo.addr, str(keyfile), *logf, source=d_addr),
            procs.spiped("-e", d_addr, str(keyfile), *logf, source=e_addr),
            procs.spiped("-e", d_addr, str(otherfile), *logf, source=wrong_addr),
            procs.spiped("-e", closed, str(keyfile), *logf, source=refused_e),
            procs.spiped("-d", closed, str(keyfile), *logf, source=refused_d),
        ]
        good_exchange(e_addr)
        assert exchange(wrong_addr, b"hello", timeout=10) == b""
        assert exchange(refused_e, b"hello", timeout=10) == b""
        with connect(d_addr) as s:
            send_quietly(s, os.urandom(400))
            drain(s)
        with connect(refused_d) as s:
            try:
                client_handshake(s, hashlib.sha256(key).digest())
            except (OSError, EOFError):
                pass
        # The daemon does not start (port in use), after reading the key.
        failed = subprocess.run(ours("-d", "-F", "-s", d_addr, "-t", echo.addr,
                                     "-k", str(keyfile), *logf),
                                capture_output=True, timeout=30)
        assert failed.returncode == 1 and b"Address already in use" in failed.stderr
        key_path = os.path.realpath(keyfile)
        for p in daemons:
            for fd in os.listdir("/proc/%d/fd" % p.pid):
                try:
                    link = os.readlink("/proc/%d/fd/%s" % (p.pid, fd))
                except OSError:
                    continue
                assert os.path.realpath(link) != key_path and "otherkey" not in link, \
                    "pid %d keeps the key file open as fd %s" % (p.pid, fd)
        for p in daemons:
            p.send_signal(signal.SIGUSR1)
        for p in daemons:
            assert wait_for(lambda: "stats:" in p.log_text(), 5), p.log_text()
        for p in daemons:
            p.send_signal(signal.SIGTERM)
            assert p.wait(10) == 0
    finally:
        echo.close()
    logs = {p.log: p.log_text().encode() for p in daemons}
    logs["start-up failure"] = failed.stderr + failed.stdout
    # The failures really happened and were logged.
    text = b"".join(logs.values()).decode(errors="replace")
    assert "handshake failed" in text and "connect to %s failed" % closed in text, text
    for raw in (key, other):
        for name, needle in _needles(raw).items():
            for where, data in logs.items():
                assert needle not in data, "%s of a key appears in %s" % (name, where)
    after = os.stat(keyfile)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert keyfile.read_bytes() == key


def test_read_key_opens_read_only(tmp_path, monkeypatch):
    """spiped.read_key opens the key file without any write, create or truncate flag."""
    path = tmp_path / "key"
    raw = os.urandom(32)
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    calls = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(file, flags, *args, **kw):
        calls.append(("os.open", os.fspath(file), flags))
        return real_os_open(file, flags, *args, **kw)

    def spy_open(file, mode="r", *args, **kw):
        calls.append(("open", file, mode))
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    k = spiped.read_key(str(path))
    monkeypatch.undo()
    assert k == hashlib.sha256(raw).digest()
    mine = [c for c in calls if c[1] in (str(path), path)]
    assert mine, "read_key opened the key file by an unexpected route: %r" % calls
    write_bits = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    for how, _, flags in mine:
        if how == "os.open":
            assert flags & write_bits == 0, "os.open flags %#o" % flags
        else:
            assert set(flags) <= set("rbt"), "open mode %r" % flags
