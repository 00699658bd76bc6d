"""Several accepted keys on -d (--accept-key) and key reload on SIGHUP.

The handshake with a key ring is tested on a socketpair; the daemon is
tested against C spiped -e and C spipe, with either key, PFS and -f.
"""
import os
import signal
import socket
import subprocess
import threading

import pytest

import spiped
from conftest import (C_SPIPE, connect, c_spiped, exchange, need_c, ours,
                      tcp_addr, free_port, wait_for)

# -- the handshake with a key ring ------------------------------------------


def _ring_handshake(ring, client_key, client_fast=False, require_pfs=False,
                    client_message=None, monkeypatch=None):
    """Server with RING against a client with CLIENT_KEY over a socketpair.

    Returns (client result or HandshakeError, server result or
    HandshakeError, the keys the server derived dhmac keys from).
    """
    used = []
    if monkeypatch is not None:
        real = spiped.dhmac_keys

        def spy(key, nonce_c, nonce_s):
            if threading.current_thread().name == "ring-server":
                used.append(key)
            return real(key, nonce_c, nonce_s)
        monkeypatch.setattr(spiped, "dhmac_keys", spy)
    a, b = socket.socketpair()
    out = {}

    def server():
        try:
            out["server"] = spiped.handshake(b, ring, client=False, timeout=5,
                                             require_pfs=require_pfs)
        except spiped.HandshakeError as e:
            out["server"] = e
        b.close()

    t = threading.Thread(target=server, name="ring-server")
    t.start()
    try:
        client = spiped.handshake(a, client_key, client=True, fast=client_fast, timeout=5)
    except spiped.HandshakeError as e:
        client = e
    t.join(10)
    a.close()
    return client, out["server"], used


def _works(client, server):
    (c_seal, c_open), (s_seal, s_open) = client, server
    assert s_open.open(c_seal.seal(b"ping")) == b"ping"
    assert c_open.open(s_seal.seal(b"pong")) == b"pong"


@pytest.mark.parametrize("which", [0, 1, 2])
def test_ring_server_names_the_key_the_client_used_and_tries_all(which, monkeypatch):
    keys = [os.urandom(32) for _ in range(3)]
    ring = tuple(zip(("new.key", "old.key", "older.key"), keys))
    client, server, used = _ring_handshake(ring, keys[which], monkeypatch=monkeypatch)
    assert isinstance(server, spiped.HandshakeResult), server
    assert server.key_name == ring[which][0]
    _works(client, server)
    assert used == keys  # every key's MAC computed, whichever matched


def test_ring_refuses_a_key_not_in_it_after_trying_all(monkeypatch):
    keys = [os.urandom(32) for _ in range(3)]
    ring = tuple(zip(("a", "b", "c"), keys))
    client, server, used = _ring_handshake(ring, os.urandom(32), monkeypatch=monkeypatch)
    assert isinstance(server, spiped.HandshakeError) and server.reason == "bad-mac"
    assert isinstance(client, spiped.HandshakeError)
    assert used == keys


def test_ring_with_fast_client_and_require_pfs():
    keys = [os.urandom(32) for _ in range(2)]
    ring = (("a", keys[0]), ("b", keys[1]))
    client, server, _ = _ring_handshake(ring, keys[1], client_fast=True)
    assert server.key_name == "b"
    _works(client, server)
    client, server, _ = _ring_handshake(ring, keys[1], client_fast=True, require_pfs=True)
    assert isinstance(server, spiped.HandshakeError) and server.reason == "no-pfs"


def test_one_key_ring_is_the_bare_key(monkeypatch):
    key = os.urandom(32)
    client, server, used = _ring_handshake(key, key, monkeypatch=monkeypatch)
    assert server.key_name is None and client.key_name is None
    _works(client, server)
    assert used == [key]  # one derivation, as without rings
    client, server, _ = _ring_handshake((("only", key),), key)
    assert server.key_name == "only"
    _works(client, server)


def test_match_key_checks_garbage_after_the_mac():
    """A y >= p with a valid MAC under the second key fails as garbage."""
    keys = [os.urandom(32) for _ in range(2)]
    nc, ns = os.urandom(32), os.urandom(32)
    y = b"\xff" * spiped.DH_SIZE
    mac_c, _ = spiped.dhmac_keys(keys[1], nc, ns)
    message = y + spiped.hmac_sha256(mac_c, y)
    name, key, found_c, _ = spiped.match_key((("a", keys[0]), ("b", keys[1])), nc, ns, message)
    assert (name, key, found_c) == ("b", keys[1], mac_c)
    with pytest.raises(spiped.HandshakeError) as info:
        spiped.check_dh_message(message, found_c, False)
    assert info.value.reason == "garbage"
    assert spiped.match_key((("a", keys[0]),), nc, ns, message) is None
