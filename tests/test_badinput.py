"""Hostile or broken peers: each must cost only its own connection.

Most cases aim at the -d end (the one that faces the network) and run
against ours and, as the reference, C spiped 1.6.2.  A small protocol
client written here (on spiped's own handshake helpers and packet
sealer) sends exactly the bytes each case needs over a raw socket.
After every bad connection the daemon must still serve a good client,
and the target must never see a byte from the bad one.
"""
import hmac
import os
import socket
import struct
import threading
import time

import pytest

from conftest import TargetServer, connect, drain, key_of, need_c, recv_all, recv_exact, wait_for
import spiped

try:
    from Cryptodome.Cipher import AES
except ImportError:
    from Crypto.Cipher import AES

# -d implementations to test; C is the reference where installed.
D_IMPLS = ["ours", pytest.param("c", marks=need_c)]

DROP_TIMEOUT = 5.0


# -- a protocol client over a raw socket -------------------------------------


class RawClient:
    """The client (-e) role of the protocol, byte by byte, with its keys exposed."""

    def __init__(self, addr, key):
        self.key = key
        self.sock = connect(addr, timeout=DROP_TIMEOUT)

    def handshake(self, fast=False):
        """Run the client handshake; sets the traffic keys; returns self."""
        s = self.sock
        nonce_c = os.urandom(spiped.NONCE_SIZE)
        s.sendall(nonce_c)
        nonce_s = recv_exact(s, spiped.NONCE_SIZE)
        mac_c, mac_s = spiped.dhmac_keys(self.key, nonce_c, nonce_s)
        exponent, y = spiped.dh_keypair(fast)
        s.sendall(y + spiped.hmac_sha256(mac_c, y))
        y_s = spiped.check_dh_message(recv_exact(s, spiped.DH_MESSAGE), mac_s, False)
        shared = spiped.dh_shared(exponent, y_s)
        self.e_c, self.h_c, self.e_s, self.h_s = spiped.traffic_keys(
            self.key, nonce_c, nonce_s, shared)
        self.sent = 0
        return self

    def hello(self, y):
        """Swap nonces, then send Y with a valid MAC; (nonce_c, nonce_s, the server's MAC key)."""
        nonce_c = os.urandom(spiped.NONCE_SIZE)
        self.sock.sendall(nonce_c)
        nonce_s = recv_exact(self.sock, spiped.NONCE_SIZE)
        mac_c, mac_s = spiped.dhmac_keys(self.key, nonce_c, nonce_s)
        self.sock.sendall(y + spiped.hmac_sha256(mac_c, y))
        return nonce_c, nonce_s, mac_s

    def packet(self, payload, length=None):
        """A packet with a valid MAC whose length field is LENGTH (default: the
        payload's), built with AES-CTR and HMAC directly, not with spiped."""
        if length is None:
            length = len(payload)
        n = self.sent
        padded = payload.ljust(spiped.PAYLOAD, b"\0") + struct.pack(">I", length)
        ctr = AES.new(self.e_c, AES.MODE_CTR, nonce=b"",
                      initial_value=(n << 64).to_bytes(16, "big"))
        ct = ctr.encrypt(padded)
        self.sent += 1
        return ct + hmac.digest(self.h_c, ct + struct.pack(">Q", n), "sha256")

    def expect_drop(self):
        """The server must close (EOF or reset) within DROP_TIMEOUT; returns
        any bytes that came first (there should be none)."""
        self.sock.settimeout(DROP_TIMEOUT)
        started = time.monotonic()
        try:
            got = recv_all(self.sock, reset_ends=True)
        except socket.timeout:
            raise AssertionError("connection not dropped within %ss" % DROP_TIMEOUT)
        finally:
            self.sock.close()
        assert time.monotonic() - started < DROP_TIMEOUT
        return got


def good_client(addr, key, payload=None, fast=False):
    """A well-behaved client built on spiped.handshake and the packet classes:
    sends PAYLOAD, half-closes, returns the decrypted reply up to EOF."""
    payload = os.urandom(3000) if payload is None else payload
    with connect(addr, timeout=10) as s:
        sealer, opener = spiped.handshake(s, key, client=True, fast=fast, deadline=spiped.deadline_in(10))
        s.settimeout(10)
        s.sendall(sealer.seal(payload))
        s.shutdown(socket.SHUT_WR)
        wire = recv_all(s)
    assert len(wire) % spiped.PACKET == 0
    return payload, opener.open(wire)


def assert_served(addr, key, target, before=0):
    """A good client is echoed intact (or, with a sink target, gets nothing
    back) and its bytes are all the target got besides BEFORE."""
    sent, got = good_client(addr, key)
    assert got == (sent if target.mode == "echo" else b"")
    wait_target_idle(target)
    assert target.total_received() == before + len(sent)


def nothing_passes(addr, payload, target):
    """Send PAYLOAD to ADDR (an -e): the connection ends with nothing back and
    TARGET gets nothing."""
    with connect(addr, timeout=10) as s:
        s.sendall(payload)
        s.settimeout(DROP_TIMEOUT)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    wait_target_idle(target)
    assert target.total_received() == 0


def wait_target_idle(target, timeout=5.0, accepted=0):
    """Wait until the echo target accepted at least ACCEPTED connections
    (the daemon's connect can be ahead of the target's accept) and every
    one of them has ended."""
    def idle():
        with target.lock:
            return target.connections >= accepted and \
                len(target.received) == target.connections

    if not wait_for(idle, timeout):
        raise AssertionError("target connections still open")


@pytest.fixture
def decrypter(procs, keyfile, echo):
    """start(IMPL, *FLAGS, mode="echo"): IMPL's -d FLAGS -k KEYFILE in front of a
    new EchoServer(mode=MODE); (its address, the target)."""
    def start(impl, *flags, mode="echo"):
        target = echo(mode=mode)
        return procs.spiped("-d", target.addr, keyfile, *flags, impl=impl).addr, target
    return start


def check_dropped_and_still_serving(client, addr, key, target):
    """CLIENT's connection is dropped with nothing forwarded; the next one works."""
    assert client.expect_drop() == b""
    wait_target_idle(target)
    assert target.total_received() == 0
    assert_served(addr, key, target)


# -- the handshake -----------------------------------------------------------


@pytest.mark.parametrize("impl", D_IMPLS)
def test_garbage_instead_of_handshake(decrypter, keyfile, impl):
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile))
    c.sock.sendall(os.urandom(spiped.NONCE_SIZE + spiped.DH_MESSAGE))
    # The server's nonce comes at once; its DH message must never come.
    assert len(recv_exact(c.sock, spiped.NONCE_SIZE)) == spiped.NONCE_SIZE
    check_dropped_and_still_serving(c, addr, c.key, target)


@pytest.mark.parametrize("impl", D_IMPLS)
def test_truncated_handshake_then_eof(decrypter, keyfile, impl):
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile))
    c.sock.sendall(os.urandom(spiped.NONCE_SIZE))
    assert len(recv_exact(c.sock, spiped.NONCE_SIZE)) == spiped.NONCE_SIZE
    c.sock.sendall(os.urandom(100))      # the start of a DH message only
    c.sock.shutdown(socket.SHUT_WR)
    check_dropped_and_still_serving(c, addr, c.key, target)


@pytest.mark.parametrize("impl", D_IMPLS)
def test_dh_value_not_below_p(decrypter, keyfile, impl):
    """y = p with a valid MAC is refused before the server sends its own y."""
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile))
    c.hello(spiped.DH_PRIME_BYTES)
    check_dropped_and_still_serving(c, addr, c.key, target)


@pytest.mark.parametrize("impl", D_IMPLS)
def test_wrong_key(decrypter, keyfile, otherkey, impl):
    """A client with another key: dropped in the handshake, the target gets nothing."""
    addr, target = decrypter(impl)
    with connect(addr, timeout=10) as s:
        with pytest.raises(spiped.HandshakeError):
            spiped.handshake(s, key_of(otherkey), client=True, deadline=spiped.deadline_in(DROP_TIMEOUT))
    wait_target_idle(target)
    assert target.total_received() == 0
    assert_served(addr, key_of(keyfile), target)


@need_c
@pytest.mark.parametrize("impl", ["ours", "c"])
def test_wrong_key_through_c_client(procs, keyfile, otherkey, echo, impl):
    """C spiped -e with the other key in front of our (or C's) -d."""
    target = echo()
    e, d = procs.chain(target.addr, keyfile, e_impl="c", d_impl=impl, e_key=otherkey)
    nothing_passes(e.addr, b"secret data", target)
    assert_served(d.addr, key_of(keyfile), target)


# -d side flags, -e side flags, which one refuses.
PFS_CLASHES = [("-g", "-f"), ("-f", "-g")]


@need_c
@pytest.mark.parametrize("d_flag,e_flag", PFS_CLASHES, ids=["d-g_e-f", "d-f_e-g"])
@pytest.mark.parametrize("d_impl,e_impl", [("ours", "c"), ("c", "ours"), ("c", "c")],
                         ids=["ours-d_c-e", "c-d_ours-e", "c-d_c-e"])
def test_require_pfs_against_fast(procs, keyfile, echo, d_impl, e_impl, d_flag, e_flag):
    """-g on one end and -f on the other: no connection, the target gets nothing."""
    target = echo()
    e, d = procs.chain(target.addr, keyfile, e_impl=e_impl, d_impl=d_impl, e_extra=(e_flag,),
                       d_extra=(d_flag,))
    nothing_passes(e.addr, b"must not arrive", target)
    # The -d end still serves a client whose handshake suits its flag.
    sent, got = good_client(d.addr, key_of(keyfile), fast=(d_flag == "-f"))
    assert got == sent


@pytest.mark.parametrize("impl", D_IMPLS)
def test_handshake_timeout(decrypter, keyfile, impl):
    """-o 1 and a silent client: our nonce at once, then closed after about 1 s."""
    addr, target = decrypter(impl, "-o", "1")
    with connect(addr, timeout=10) as s:
        started = time.monotonic()
        assert len(recv_exact(s, spiped.NONCE_SIZE)) == spiped.NONCE_SIZE
        assert time.monotonic() - started < 0.7
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - started
    assert 0.8 <= elapsed <= 3.0, elapsed
    assert_served(addr, key_of(keyfile), target)


# -- packets after a good handshake ------------------------------------------


def test_packet_builder_matches_sealer(decrypter, keyfile):
    """The hand-made packets below are exactly what PacketSealer makes."""
    addr, target = decrypter("ours")
    c = RawClient(addr, key_of(keyfile)).handshake()
    sealer = spiped.PacketSealer(c.e_c, c.h_c)
    for payload in (b"x", os.urandom(1024)):
        assert c.packet(payload) == sealer.seal(payload)
    c.sock.close()


@pytest.mark.parametrize("where", ["ciphertext", "length-field", "mac"])
@pytest.mark.parametrize("impl", D_IMPLS)
def test_flipped_bit(decrypter, keyfile, impl, where):
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile)).handshake()
    packet = bytearray(c.packet(b"hello, target"))
    bit = {"ciphertext": 3 * 8 + 5, "length-field": 1027 * 8, "mac": 1040 * 8 + 7}[where]
    packet[bit // 8] ^= 1 << (bit % 8)
    c.sock.sendall(packet)
    check_dropped_and_still_serving(c, addr, c.key, target)


@pytest.mark.parametrize("length", [0, 1025, 0xFFFFFFFF])
@pytest.mark.parametrize("impl", D_IMPLS)
def test_bad_length_with_valid_mac(decrypter, keyfile, impl, length):
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile)).handshake()
    c.sock.sendall(c.packet(b"" if length == 0 else b"A" * 1024, length=length))
    check_dropped_and_still_serving(c, addr, c.key, target)


@pytest.mark.parametrize("impl", D_IMPLS)
def test_good_packet_then_bad_one(decrypter, keyfile, impl):
    """Nothing from the bad packet or after it reaches the target.

    The good packet before it may or may not be forwarded: ours forwards it;
    C 1.6.2 drops it too when both arrive in one segment.
    """
    addr, target = decrypter(impl, mode="sink")  # no echo data that could race the drop
    c = RawClient(addr, key_of(keyfile)).handshake()
    good = c.packet(b"first")
    bad = bytearray(c.packet(b"second"))
    bad[10] ^= 0x40
    c.sock.sendall(good + bytes(bad) + c.packet(b"third"))
    c.sock.settimeout(DROP_TIMEOUT)
    try:
        while c.sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    c.sock.close()
    wait_target_idle(target, accepted=1)  # the handshake completed: -d had dialled
    forwarded = b"".join(target.received)
    assert forwarded in (b"", b"first")
    assert_served(addr, c.key, target, before=len(forwarded))


def read_echo(client, opener, size):
    """Read packets from the server until SIZE plaintext bytes came back,
    which proves the target received them."""
    got = b""
    while len(got) < size:
        got += opener.open(recv_exact(client.sock, spiped.PACKET))
    return got


@pytest.mark.parametrize("impl", D_IMPLS)
def test_replayed_packet(decrypter, keyfile, impl):
    """The same valid packet sent twice: the copy carries the wrong number."""
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile)).handshake()
    packet = c.packet(b"only once")
    c.sock.sendall(packet)
    assert read_echo(c, spiped.PacketOpener(c.e_s, c.h_s), 9) == b"only once"
    c.sock.sendall(packet)
    assert c.expect_drop() == b""
    wait_target_idle(target)
    assert target.received == [b"only once"]
    assert_served(addr, c.key, target, before=len(b"only once"))


@pytest.mark.parametrize("impl", D_IMPLS)
def test_reflected_packet(decrypter, keyfile, impl):
    """A packet the server sent, sent back to it: the directions have separate keys."""
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile)).handshake()
    c.sock.sendall(c.packet(b"ping"))
    reply = recv_exact(c.sock, spiped.PACKET)
    assert spiped.PacketOpener(c.e_s, c.h_s).open(reply) == b"ping"
    # The server's packet 0 comes back where client packet 1 is due: it was
    # sealed with the server's keys, so its MAC cannot check out.
    c.sock.sendall(reply)
    assert c.expect_drop() == b""
    wait_target_idle(target)
    assert target.received == [b"ping"]


@pytest.mark.parametrize("impl", D_IMPLS)
def test_dh_value_zero_is_accepted(decrypter, keyfile, impl):
    """y = 0 passes the y < p check (C does not reject it); the shared value is
    then 0 and both ends derive the same keys from it."""
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile))
    nonce_c, nonce_s, mac_s = c.hello(bytes(spiped.DH_SIZE))
    spiped.check_dh_message(recv_exact(c.sock, spiped.DH_MESSAGE), mac_s, False)
    c.e_c, c.h_c, c.e_s, c.h_s = spiped.traffic_keys(c.key, nonce_c, nonce_s,
                                                     bytes(spiped.DH_SIZE))
    c.sent = 0
    c.sock.sendall(c.packet(b"zero"))
    c.sock.shutdown(socket.SHUT_WR)
    wire = recv_all(c.sock, reset_ends=True)
    c.sock.close()
    assert spiped.PacketOpener(c.e_s, c.h_s).open(wire) == b"zero"


@pytest.mark.parametrize("impl", D_IMPLS)
def test_handshake_and_packets_in_tiny_pieces(decrypter, keyfile, impl):
    """Byte boundaries mean nothing: a handshake and packets dribbled out in
    7-byte writes are served normally."""
    addr, target = decrypter(impl)
    key = key_of(keyfile)
    s = connect(addr, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        nonce_c = os.urandom(spiped.NONCE_SIZE)
        exponent, y = spiped.dh_keypair(False)

        def dribble(data):
            for k in range(0, len(data), 7):
                s.sendall(data[k:k + 7])
                time.sleep(0.0005)  # a slow sender is what is tested

        dribble(nonce_c)
        nonce_s = recv_exact(s, spiped.NONCE_SIZE)
        mac_c, mac_s = spiped.dhmac_keys(key, nonce_c, nonce_s)
        dribble(y + spiped.hmac_sha256(mac_c, y))
        y_s = spiped.check_dh_message(recv_exact(s, spiped.DH_MESSAGE), mac_s, False)
        e_c, h_c, e_s, h_s = spiped.traffic_keys(key, nonce_c, nonce_s,
                                                 spiped.dh_shared(exponent, y_s))
        payload = os.urandom(2500)
        dribble(spiped.PacketSealer(e_c, h_c).seal(payload))
        s.shutdown(socket.SHUT_WR)
        wire = recv_all(s, reset_ends=True)
    finally:
        s.close()
    assert spiped.PacketOpener(e_s, h_s).open(wire) == payload


@pytest.mark.parametrize("impl", D_IMPLS)
def test_client_reset_mid_stream(decrypter, keyfile, impl):
    """A client that vanishes with a reset while data flows costs only itself."""
    addr, target = decrypter(impl)
    c = RawClient(addr, key_of(keyfile)).handshake()
    data = os.urandom(2000)
    c.sock.sendall(c.packet(data[:1000]) + c.packet(data[1000:]))
    assert read_echo(c, spiped.PacketOpener(c.e_s, c.h_s), 2000) == data
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()
    wait_target_idle(target)
    assert target.total_received() == 2000
    assert_served(addr, c.key, target, before=2000)


class AfterEofTarget(TargetServer):
    """Reads one connection to EOF, then sends REPLY and closes."""

    REPLY = b"sent after the target saw EOF"
    backlog = 8
    accept_timeout = 15
    max_connections = 1

    def __init__(self):
        self.result = None
        self.done = threading.Event()
        super().__init__()

    def handle(self, c):
        c.settimeout(10)
        got, how = drain(c, limit=1 << 30)
        try:
            if how == "eof":
                c.sendall(self.REPLY)
                c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            c.close()
            self.result = (got, how == "eof")
            self.done.set()


@pytest.mark.parametrize("impl", D_IMPLS)
def test_partial_packet_then_eof(procs, keyfile, impl):
    """500 stray bytes then FIN count as a plain EOF: the target sees EOF and
    its reply still reaches the client."""
    target = AfterEofTarget()
    try:
        addr = procs.spiped("-d", target.addr, keyfile, impl=impl).addr
        c = RawClient(addr, key_of(keyfile)).handshake()
        c.sock.sendall(os.urandom(500))
        c.sock.shutdown(socket.SHUT_WR)
        wire = recv_all(c.sock)
        c.sock.close()
        assert target.done.wait(10)
        assert target.result == (b"", True)
        opener = spiped.PacketOpener(c.e_s, c.h_s)
        assert opener.open(wire) == AfterEofTarget.REPLY
    finally:
        target.close()


# -- the -e end facing a bad server ------------------------------------------


class FakeServer(TargetServer):
    """Plays the server role toward a spiped -e, one scripted MODE per connection.

    Modes: "wrong-key" (sends its DH value MACed with another key, without
    checking the client's), "bad-packet" (good handshake, then a packet
    with a flipped bit), "partial" (good handshake, one packet, 500 stray
    bytes, FIN), "echo" (good handshake, echoes until EOF).  Records per
    connection (number, outcome, plaintext or raw bytes received after the
    handshake).
    """

    backlog = 8
    accept_timeout = 15

    def __init__(self, key, wrong_key, modes):
        self.key, self.wrong_key, self.modes = key, wrong_key, modes
        self.max_connections = len(modes)
        self.results = []
        super().__init__()

    def on_accept(self, conn):
        number = self.connections - 1
        return number, self.modes[number]

    def handle(self, c, number, mode):
        c.settimeout(10)
        got, outcome = b"", "error"
        try:
            with c:
                if mode == "wrong-key":
                    nonce_s = os.urandom(spiped.NONCE_SIZE)
                    c.sendall(nonce_s)
                    nonce_c = recv_exact(c, spiped.NONCE_SIZE)
                    recv_exact(c, spiped.DH_MESSAGE)
                    _, mac_s = spiped.dhmac_keys(self.wrong_key, nonce_c, nonce_s)
                    _, y = spiped.dh_keypair(False)
                    c.sendall(y + spiped.hmac_sha256(mac_s, y))
                    got, outcome = recv_all(c, reset_ends=True), "closed"
                else:
                    sealer, opener = spiped.handshake(c, self.key, client=False, deadline=spiped.deadline_in(10))
                    c.settimeout(10)
                    if mode == "bad-packet":
                        packet = bytearray(sealer.seal(b"forged"))
                        packet[100] ^= 0x08
                        c.sendall(packet)
                        got, outcome = recv_all(c, reset_ends=True), "closed"
                    elif mode == "partial":
                        c.sendall(sealer.seal(b"before the stray bytes") + os.urandom(500))
                        c.shutdown(socket.SHUT_WR)
                        wire = recv_all(c, reset_ends=True)
                        got, outcome = opener.open(wire), "eof"
                    else:
                        wire = recv_all(c, reset_ends=True)
                        data = opener.open(wire[:len(wire) - len(wire) % spiped.PACKET])
                        c.sendall(sealer.seal(data))
                        c.shutdown(socket.SHUT_WR)
                        got, outcome = data, "echoed"
        except (OSError, EOFError, spiped.HandshakeError, spiped.BadPacket) as e:
            outcome = "error: %r" % (e,)
        with self.lock:
            self.results.append((number, outcome, got))

    def wait(self, count, timeout=10.0):
        def finished():
            with self.lock:
                return len(self.results) >= count and sorted(self.results)

        results = wait_for(finished, timeout)
        if not results:
            raise AssertionError("fake server finished only %d connections" % len(self.results))
        return results


def plain_exchange(addr, data):
    """Send DATA, half-close, return everything read up to EOF or reset."""
    with connect(addr, timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(DROP_TIMEOUT)
        try:
            return recv_all(s, reset_ends=True)
        except socket.timeout:
            raise AssertionError("no EOF within %ss" % DROP_TIMEOUT)


@pytest.mark.parametrize("mode", ["wrong-key", "bad-packet"])
@pytest.mark.parametrize("impl", D_IMPLS)
def test_encrypting_end_against_bad_server(procs, keyfile, otherkey, impl, mode):
    """-e meets a server with another key, or one sending a forged packet: the
    plaintext client sees EOF with no data, and the next connection works."""
    server = FakeServer(key_of(keyfile), key_of(otherkey), [mode, "echo"])
    try:
        source = procs.spiped("-e", server.addr, keyfile, impl=impl).addr
        with connect(source, timeout=10) as s:
            s.sendall(b"must stay here")
            s.settimeout(DROP_TIMEOUT)
            try:
                assert recv_all(s, reset_ends=True) == b""
            except socket.timeout:
                raise AssertionError("-e did not drop the connection")
        # With the wrong key no packet may be sent; after a forged packet the
        # connection must close (what was sent before it is not checked).
        number, outcome, got = server.wait(1)[0]
        assert (number, outcome) == (0, "closed")
        if mode == "wrong-key":
            assert got == b""
        assert plain_exchange(source, b"second try") == b"second try"
        assert server.wait(2)[1] == (1, "echoed", b"second try")
    finally:
        server.close()


@pytest.mark.parametrize("impl", D_IMPLS)
def test_encrypting_end_partial_packet_then_eof(procs, keyfile, otherkey, impl):
    """Stray bytes then FIN from the server: the plaintext client gets the good
    data and EOF, while its own data still reaches the server."""
    server = FakeServer(key_of(keyfile), key_of(otherkey), ["partial"])
    try:
        source = procs.spiped("-e", server.addr, keyfile, impl=impl).addr
        assert plain_exchange(source, b"upstream") == b"before the stray bytes"
        assert server.wait(1)[0] == (0, "eof", b"upstream")
    finally:
        server.close()
