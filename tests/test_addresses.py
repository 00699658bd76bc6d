"""--all-addresses: every address a source name resolves to, in one tunnel.

The name multi.invalid resolves to ::1 and then 127.0.0.1 through a
wrapper around getaddrinfo() (this machine's localhost may give only one);
C spiped is the peer behind ours.
"""
import os
import signal
import socket
import subprocess

import pytest

from conftest import (assert_stays, connect, exchange, free_port, have_ipv6, need_c, quiet,
                      tcp_addr, wait_for, wait_listening)
from test_interop import resolving

pytestmark = [need_c, pytest.mark.skipif(not have_ipv6(), reason="no IPv6 on loopback")]


def free_both():
    """A port free on 127.0.0.1 and on ::1 a moment ago."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both loopbacks")


@pytest.fixture
def tunnel(procs, keyfile, echo, tmp_path):
    """(start, PORT): start(*EXTRA) runs ours -e EXTRA on multi.invalid:PORT -> C -d -> echo."""
    back = procs.spiped("-d", echo().addr, keyfile, impl="c")
    port = free_both()

    def start(*extra):
        return procs.spiped("-e", back.addr, keyfile, *extra, source="multi.invalid:%d" % port,
                            impl=resolving(tmp_path))
    return start, port


def test_both_families_served_by_one_daemon(tunnel):
    start, port = tunnel
    p = start("--all-addresses")
    for addr in ("[::1]:%d" % port, tcp_addr(port)):
        wait_listening(addr, p)
    for addr in ("[::1]:%d" % port, tcp_addr(port)):
        payload = os.urandom(50_000)
        assert exchange(addr, payload, timeout=30) == payload, p.log_text()
    assert "Using the first" not in p.log_text()
    p.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: "stats:" in p.log_text())
    assert "total=2 " in p.log_text(), p.log_text()  # one set of statistics
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0


def test_one_limit_across_both_families(tunnel):
    start, port = tunnel
    p = start("--all-addresses", "-n", "1")
    for addr in ("[::1]:%d" % port, tcp_addr(port)):
        wait_listening(addr, p)
    first = connect(tcp_addr(port), timeout=10)
    first.sendall(b"first")
    assert first.recv(64) == b"first"
    second = connect("[::1]:%d" % port, timeout=10)  # waits in the backlog
    second.sendall(b"second")
    assert_stays(lambda: quiet(second), 1.0, what="served while -n is reached")
    first.close()
    assert second.recv(64) == b"second"
    second.close()
    assert "Maximum number of connections (1) reached" in p.log_text()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0


def test_without_the_option_only_the_first_address(tunnel):
    start, port = tunnel
    p = start()
    wait_listening("[::1]:%d" % port, p)
    assert "Using the first of multiple addresses found for multi.invalid" in p.log_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0


def test_a_failing_bind_names_its_address(tmp_path, keyfile):
    port = free_both()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        r = subprocess.run(resolving(tmp_path)("-e", "-F", "--all-addresses",
                                               "-s", "multi.invalid:%d" % port,
                                               "-t", "[127.0.0.1]:1", "-k", keyfile),
                           capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.decode() == ("spiped: Error binding socket: [127.0.0.1]:%d:"
                                 " Address already in use\n" % port)
