"""The thread stack size the daemon sets (THREAD_STACK) fits a connection.

A connection's threads run the handshake with PFS (big-number arithmetic
in C), both relays and, on an unexpected exception, the formatting of a
traceback.  Here each of these runs in threads created with
threading.stack_size(spiped.THREAD_STACK), as the daemon creates them; a
stack that is too small crashes the interpreter, which fails the test.
"""
import hashlib
import socket
import threading
import traceback

import spiped


def _in_small_thread(fn):
    """Run FN in a new thread with the daemon's stack size; return its result."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # reported to the test below
            out["error"] = e

    old = threading.stack_size(spiped.THREAD_STACK)
    try:
        t = threading.Thread(target=run)
        t.start()
    finally:
        threading.stack_size(old)
    return t, out


def _deep(n):
    return _deep(n - 1) if n else traceback.format_stack()


def test_handshake_relays_and_traceback_fit_the_thread_stack():
    key = bytes(range(32))
    payload = hashlib.sha256(b"stack").digest() * 4096   # 128 KiB
    a, b = socket.socketpair()       # client -e  <->  server -d
    pa, pb = socket.socketpair()     # plaintext in  -> -e
    qa, qb = socket.socketpair()     # -d -> plaintext out
    got = bytearray()

    def server():
        sealer, opener = spiped.handshake(b, key, client=False, deadline=spiped.deadline_in(10))
        spiped.relay(b.recv, opener, qa.sendall, lambda: b.recv(1, socket.MSG_PEEK))
        qa.shutdown(socket.SHUT_WR)
        return sealer

    def client():
        sealer, opener = spiped.handshake(a, key, client=True, deadline=spiped.deadline_in(10),
                                          keys=spiped.DHKeyPool())
        spiped.relay(pb.recv, sealer, a.sendall)
        a.shutdown(socket.SHUT_WR)
        return opener

    def error_path():
        try:
            raise RuntimeError("x")
        except RuntimeError:
            return traceback.format_exc() + "".join(_deep(200))

    threads = [_in_small_thread(fn) for fn in (server, client, error_path)]
    pa.sendall(payload)
    pa.shutdown(socket.SHUT_WR)
    qb.settimeout(30)
    while True:
        chunk = qb.recv(65536)
        if not chunk:
            break
        got += chunk
    for t, out in threads:
        t.join(30)
        assert not t.is_alive()
        assert "error" not in out, out.get("error")
    assert bytes(got) == payload
    assert "RuntimeError" in threads[2][1]["value"]
    for s in (a, b, pa, pb, qa, qb):
        s.close()
