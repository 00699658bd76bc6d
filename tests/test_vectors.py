"""Known-answer tests: every vector recorded from C spiped, positive and negative."""
import glob
import json
import os
import sys
import socket
import threading

import pytest

from conftest import VECTORS
import spiped

FILES = sorted(glob.glob(os.path.join(VECTORS, "*.json")))
POSITIVE = [f for f in FILES if not f.endswith("negative.json")]
H = bytes.fromhex


def load(path):
    with open(path) as f:
        return json.load(f)


def test_vectors_present():
    assert len(POSITIVE) >= 10, "tests/vectors missing"


@pytest.mark.parametrize("path", POSITIVE, ids=os.path.basename)
def test_key_and_handshake_values(path, tmp_path):
    v = load(path)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(H(v["key_file_hex"]))
    os.chmod(keyfile, 0o600)
    key = spiped.read_key(str(keyfile))
    assert key.hex() == v["K"]
    nc, ns = H(v["nonce_client"]), H(v["nonce_server"])
    mac_c, mac_s = spiped.dhmac_keys(key, nc, ns)
    assert mac_c.hex() == v["dhmac_client"]
    assert mac_s.hex() == v["dhmac_server"]
    for side, fast in (("client", v["client_fast_mode"]), ("server", v["server_fast_mode"])):
        y = H(v["y_" + side])
        dhmac = mac_c if side == "client" else mac_s
        assert spiped.hmac_sha256(dhmac, y).hex() == v["y_%s_mac" % side]
        if fast:
            assert y == spiped.DH_ONE
        # The receiver's checks accept every value C sent.
        assert spiped.check_dh_message(y + H(v["y_%s_mac" % side]), dhmac, False) == y
        if v.get("x_" + side):
            exponent, y_ours = spiped.dh_keypair(False, H(v["x_" + side]))
            assert y_ours == y
            assert exponent == int(v["dh_exponent_" + side], 16)
    if v["shared_secret"] is None:
        return
    shared = H(v["shared_secret"])
    if v["client_fast_mode"] or v["server_fast_mode"]:
        assert shared == spiped.DH_ONE
    elif v.get("x_client"):
        e_c, _ = spiped.dh_keypair(False, H(v["x_client"]))
        e_s, _ = spiped.dh_keypair(False, H(v["x_server"]))
        assert spiped.dh_shared(e_c, H(v["y_server"])) == shared
        assert spiped.dh_shared(e_s, H(v["y_client"])) == shared
    keys = spiped.traffic_keys(key, nc, ns, shared)
    assert [k.hex() for k in keys] == [v["e_client"], v["h_client"], v["e_server"], v["h_server"]]


def _power_functions():
    """Every way _modexp() may compute: Cryptodome's Integer (a daemon), its
    monty_pow (spipe) and the built-in pow() (either, without those)."""
    spiped.load_cipher()
    monty = spiped._monty_power()
    assert monty is not None, "Cryptodome's monty_pow could not be loaded"
    return {"integer": spiped._power_function(), "monty_pow": monty,
            "builtin": spiped._builtin_power}


@pytest.mark.parametrize("power", ["integer", "monty_pow", "builtin"])
def test_every_power_function_gives_the_recorded_values(power):
    """y = 2^x and the shared value of every vector recorded with its exponents."""
    compute = _power_functions()[power]
    checked = 0
    for v in map(load, POSITIVE):
        if not v.get("x_client") or v["client_fast_mode"] or v["server_fast_mode"]:
            continue
        for side, other in (("client", "server"), ("server", "client")):
            exponent = int(v["dh_exponent_" + side], 16)
            assert compute(spiped._DH_TWO, exponent) == H(v["y_" + side])
            assert compute(H(v["y_" + other]), exponent) == H(v["shared_secret"])
        checked += 1
    assert checked >= 1


def _keys(v):
    return {
        "client_to_server": (H(v["e_client"]), H(v["h_client"])),
        "server_to_client": (H(v["e_server"]), H(v["h_server"])),
    }


@pytest.fixture(params=["direct", "public"])
def cipher_calls(request, monkeypatch):
    """Each packet test twice: one packet through Cryptodome's C functions, and
    through its public AES/strxor calls (what a Cryptodome without them gets)."""
    spiped.load_cipher()
    if request.param == "public":
        monkeypatch.setattr(spiped, "_CRYPT_ONE_RAW", None)
    return request.param


def test_one_packet_uses_the_direct_calls():
    """The installed Cryptodome, on whichever back end it picked (cffi where
    cffi is importable, else ctypes), has the C functions the small-message
    path calls, and a packet's codec calls them."""
    from Cryptodome.Util import _raw_api
    assert _raw_api.backend in ("cffi", "ctypes")
    assert spiped.load_cipher()
    assert spiped._CRYPT_ONE_RAW is not None
    sealer = spiped.PacketSealer(bytes(32), bytes(32))
    assert sealer._crypt_one is spiped._CRYPT_ONE_RAW
    opener = spiped.PacketOpener(bytes(32), bytes(32))
    assert opener.feed(sealer.seal(b"x" * 64)) == b"x" * 64


@pytest.mark.parametrize("codec", [spiped.PacketSealer, spiped.PacketOpener])
def test_a_dropped_codec_is_freed_without_the_cycle_collector(codec, cipher_calls):
    """Dropping a connection's codec frees its cipher and MAC states at once:
    nothing in it refers back to it, so no cycle waits for the collector."""
    import gc
    import weakref
    enabled = gc.isenabled()
    gc.disable()
    try:
        c = codec(bytes(32), bytes(32))
        c._crypt_one(c._cipher, spiped._be64(0), bytes(spiped.PADDED))
        ref = weakref.ref(c)
        del c
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


def test_the_direct_calls_come_from_the_package_that_gave_aes():
    """C functions are taken only from AES's own package: a package that is
    not there gives the public calls, never another package's library."""
    assert spiped.load_cipher()
    package = spiped.AES.__name__.split(".")[0]
    assert spiped._raw_crypt_one("no_such_cryptodome") is None
    crypt_one = spiped._raw_crypt_one(package)
    assert crypt_one is not None
    ecb = sys.modules[package + ".Cipher._mode_ecb"]
    assert crypt_one.encrypt is ecb.raw_ecb_lib.ECB_encrypt


@pytest.mark.parametrize("path", POSITIVE, ids=os.path.basename)
def test_packets_seal_and_open(path, cipher_calls):
    v = load(path)
    if v["shared_secret"] is None:
        pytest.skip("both sides used PFS with unknown exponents: no traffic keys")
    keys = _keys(v)
    packets = v["packets"]
    if not packets:
        # Nothing was sent either way: both streams end right after the handshake.
        assert v["plaintext_client_to_server"] == v["plaintext_server_to_client"] == ""
    for direction, (e, h) in keys.items():
        mine = [p for p in packets if p["direction"] == direction]
        sealer = spiped.PacketSealer(e, h)
        opener = spiped.PacketOpener(e, h)
        for p in mine:
            assert sealer.number == p["number"]
            wire = sealer.seal(H(p["plaintext_hex"]))
            assert wire.hex() == p["wire_hex"]
            assert opener.open(H(p["wire_hex"])) == H(p["plaintext_hex"])
        # One batch over all of them gives the same bytes.
        if mine:
            batch_open = spiped.PacketOpener(e, h)
            wire = b"".join(H(p["wire_hex"]) for p in mine)
            assert batch_open.open(wire) == b"".join(H(p["plaintext_hex"]) for p in mine)


@pytest.mark.parametrize("path", POSITIVE, ids=os.path.basename)
def test_whole_wire_streams(path):
    """Nonce, y, MAC and packets make up exactly the recorded byte streams."""
    v = load(path)
    for direction, side in (("client_to_server", "client"), ("server_to_client", "server")):
        wire = H(v["wire_%s" % direction])
        head = H(v["nonce_" + side]) + H(v["y_" + side]) + H(v["y_%s_mac" % side])
        assert wire.startswith(head)
        body = wire[len(head):]
        assert len(body) % spiped.PACKET == 0
        if v["shared_secret"] is None:
            continue
        e, h = _keys(v)[direction]
        assert spiped.PacketOpener(e, h).open(body) == H(v["plaintext_%s" % direction])


def test_sealer_batches_equal_single_packets(cipher_calls):
    e, h = os.urandom(32), os.urandom(32)
    data = os.urandom(70000)
    one = spiped.PacketSealer(e, h).seal(data)
    step = spiped.PacketSealer(e, h)
    parts = b"".join(step.seal(data[i:i + 1024]) for i in range(0, len(data), 1024))
    assert one == parts
    assert len(one) == 69 * spiped.PACKET
    assert spiped.PacketOpener(e, h).open(one) == data
    each = spiped.PacketOpener(e, h)
    size = spiped.PACKET
    assert b"".join(each.open(one[i:i + size]) for i in range(0, len(one), size)) == data
    assert each.number == 69 and each.plaintext == len(data)
    assert spiped.PacketSealer(e, h).seal(b"") == b""


NEGATIVE = load(os.path.join(VECTORS, "negative.json"))["vectors"]


@pytest.mark.parametrize("v", NEGATIVE, ids=lambda v: v["name"])
def test_negative(v, cipher_calls):
    if v["kind"] == "packet":
        e, h = _keys(v)[v["direction"]]
        opener = spiped.PacketOpener(e, h, number=v["number"])
        assert v["expected"] == "reject"
        with pytest.raises(spiped.BadPacket) as info:
            opener.open(H(v["wire_hex"]))
        assert info.value.good == b""
        return
    dhmac = H(v["dhmac_client"] if v["direction"] == "client_to_server" else v["dhmac_server"])
    message = H(v["y"]) + H(v["y_mac"])
    if v["expected"] == "accept":
        assert spiped.check_dh_message(message, dhmac, v["requirepfs"]) == H(v["y"])
    else:
        with pytest.raises(spiped.HandshakeError):
            spiped.check_dh_message(message, dhmac, v["requirepfs"])


def test_bad_packet_keeps_authentic_prefix():
    e, h = os.urandom(32), os.urandom(32)
    wire = bytearray(spiped.PacketSealer(e, h).seal(b"a" * 3000))
    wire[2 * spiped.PACKET + 5] ^= 1
    with pytest.raises(spiped.BadPacket) as info:
        spiped.PacketOpener(e, h).open(bytes(wire))
    assert info.value.good == b"a" * 2048


def _socket_handshake(v, client_fast, server_fast):
    """Run our handshake over a socketpair with the vector's random values."""
    key = H(v["K"])
    a, b = socket.socketpair()
    result = {}

    def server():
        result["server"] = spiped.handshake(
            b, key, client=False, fast=server_fast, deadline=spiped.deadline_in(5),
            nonce=H(v["nonce_server"]), secret=H(v["x_server"]) if v.get("x_server") else None)

    t = threading.Thread(target=server)
    t.start()
    client = spiped.handshake(a, key, client=True, fast=client_fast, deadline=spiped.deadline_in(5),
                              nonce=H(v["nonce_client"]),
                              secret=H(v["x_client"]) if v.get("x_client") else None)
    t.join()
    a.close()
    b.close()
    return client, result["server"]


def test_handshake_on_socket_matches_computed_vector():
    v = load(os.path.join(VECTORS, "computed_pfs_fixed_x.json"))
    (c_seal, c_open), (s_seal, s_open) = _socket_handshake(v, False, False)
    first = [p for p in v["packets"] if p["direction"] == "client_to_server"][0]
    assert c_seal.seal(H(first["plaintext_hex"])).hex() == first["wire_hex"]
    reply = [p for p in v["packets"] if p["direction"] == "server_to_client"][0]
    assert s_seal.seal(H(reply["plaintext_hex"])).hex() == reply["wire_hex"]


def test_handshake_on_socket_matches_recorded_fast_vector():
    path = os.path.join(VECTORS, "recorded_fast_both_key32_ping_pong.json")
    v = load(path)
    (c_seal, _), (s_seal, _) = _socket_handshake(v, True, True)
    for p in v["packets"]:
        sealer = c_seal if p["direction"] == "client_to_server" else s_seal
        assert sealer.seal(H(p["plaintext_hex"])).hex() == p["wire_hex"]


def failed_handshake(server_key, client_key, require_pfs=False, fast=False):
    """A handshake over a socketpair that the client must fail; the server's failure reasons."""
    a, b = socket.socketpair()
    errors = []

    def server():
        try:
            spiped.handshake(b, server_key, client=False, require_pfs=require_pfs,
                             deadline=spiped.deadline_in(5))
        except spiped.HandshakeError as e:
            errors.append(e.reason)
        b.close()

    t = threading.Thread(target=server)
    t.start()
    with pytest.raises(spiped.HandshakeError):
        spiped.handshake(a, client_key, client=True, fast=fast, deadline=spiped.deadline_in(5))
    t.join()
    a.close()
    return errors


def test_require_pfs_refuses_fast_peer():
    key = os.urandom(32)
    assert failed_handshake(key, key, require_pfs=True, fast=True) == ["no-pfs"]


def test_wrong_key_is_a_mac_failure():
    assert failed_handshake(os.urandom(32), os.urandom(32)) == ["bad-mac"]


def test_handshake_timeout():
    a, b = socket.socketpair()
    with pytest.raises(spiped.HandshakeError) as info:
        spiped.handshake(a, os.urandom(32), client=True, deadline=spiped.deadline_in(0.3))
    assert info.value.reason == "timeout"
    a.close()
    b.close()
