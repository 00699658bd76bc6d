"""PROXY protocol headers (--proxy-protocol) and --connect-after-auth.

The header bytes are checked against examples worked out by hand from
HAProxy's proxy-protocol.txt; then whole chains with C spiped as the far
end show that the target receives a header naming the real client, and a
real PROXY-protocol server from Debian (nginx) logs that client.
"""
import os
import shutil
import socket
import struct
import subprocess
import threading

import pytest

import spiped
from conftest import (C_SPIPE, TargetServer, connect, free_port, have_ipv6, need_c, ours,
                      ours_spipe, tcp_addr, unavailable, wait_for)

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # version 2 signature, 12 bytes

# -- the header bytes ----------------------------------------------------------


def test_v1_tcp4_spec_example():
    h = spiped.proxy_header(1, socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert h == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_tcp6():
    h = spiped.proxy_header(1, socket.AF_INET6, ("2001:db8::1", 1234, 0, 0), ("::1", 443, 0, 0))
    assert h == b"PROXY TCP6 2001:db8::1 ::1 1234 443\r\n"


def test_v1_longest_tcp6_line():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    h = spiped.proxy_header(1, socket.AF_INET6, (full, 65535, 0, 0), (full, 65535, 0, 0))
    assert h == ("PROXY TCP6 %s %s 65535 65535\r\n" % (full, full)).encode()
    assert len(h) == 104  # the specification's maximum for TCP6


def test_v1_unknown_for_unix_and_other_families():
    assert spiped.proxy_header(1, socket.AF_UNIX, "", "/run/s.sock") == b"PROXY UNKNOWN\r\n"
    assert spiped.proxy_header(1, None, None, None) == b"PROXY UNKNOWN\r\n"


def test_v2_tcp4():
    h = spiped.proxy_header(2, socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443))
    # ver/cmd 0x21, TCP over IPv4 0x11, length 12; addresses; ports 0xdc04, 0x01bb.
    assert h == SIG + bytes.fromhex("21 11 000c c0a80001 c0a8000b dc04 01bb")
    assert len(h) == 16 + 12


def test_v2_tcp6():
    h = spiped.proxy_header(2, socket.AF_INET6, ("2001:db8::1", 1234, 0, 0), ("::1", 443, 0, 0))
    assert h == SIG + bytes.fromhex(
        "21 21 0024"
        "20010db8 00000000 00000000 00000001"
        "00000000 00000000 00000000 00000001"
        "04d2 01bb")
    assert len(h) == 16 + 36


def test_v2_unix_paths_are_108_bytes_each():
    h = spiped.proxy_header(2, socket.AF_UNIX, "", "/run/s.sock")
    assert h == SIG + bytes.fromhex("21 31 00d8") + bytes(108) + b"/run/s.sock" + bytes(108 - 11)
    assert len(h) == 16 + 216
    h = spiped.proxy_header(2, socket.AF_UNIX, b"\0abstract", "/a")
    assert h[16:16 + 108] == b"\0abstract" + bytes(99)
    assert h[16 + 108:] == b"/a" + bytes(106)


def test_v2_local_when_there_is_no_address():
    local = SIG + bytes.fromhex("20 00 0000")
    assert spiped.proxy_header(2, socket.AF_UNIX, "", "") == local
    assert spiped.proxy_header(2, None, None, None) == local


def test_ipv4_mapped_pair_is_described_as_ipv4():
    src, dst = ("::ffff:192.0.2.7", 5000, 0, 0), ("::ffff:192.0.2.8", 80, 0, 0)
    assert spiped.proxy_header(1, socket.AF_INET6, src, dst) == \
        b"PROXY TCP4 192.0.2.7 192.0.2.8 5000 80\r\n"
    assert spiped.proxy_header(2, socket.AF_INET6, src, dst) == \
        SIG + bytes.fromhex("21 11 000c c0000207 c0000208 1388 0050")


def test_v1_ipv6_text_has_no_dotted_tail_and_no_scope():
    h = spiped.proxy_header(1, socket.AF_INET6, ("::ffff:1.2.3.4", 5, 0, 0), ("fe80::1%lo", 6, 0, 1))
    assert h == b"PROXY TCP6 0:0:0:0:0:ffff:102:304 fe80::1 5 6\r\n"


def test_other_versions_are_refused():
    for version in (0, 3, "1"):
        with pytest.raises(ValueError):
            spiped.proxy_header(version, socket.AF_INET, ("1.2.3.4", 1), ("1.2.3.4", 2))


# -- chains with C spiped ------------------------------------------------------


class Recorder(TargetServer):
    """A target that keeps what each connection sent, readable while it runs.

    At the client's EOF it answers b"done" and half-closes.
    """

    def __init__(self, addr=None):
        self.data = []
        super().__init__(addr)

    def handle(self, c):
        got = bytearray()
        with self.lock:
            self.data.append(got)
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            with self.lock:
                got += chunk
        c.sendall(b"done")
        c.shutdown(socket.SHUT_WR)

    def received(self, index=0):
        with self.lock:
            return bytes(self.data[index]) if len(self.data) > index else None


@pytest.fixture
def recorder(closing):
    """Makes Recorders, closed after the test."""
    return lambda addr=None: closing(Recorder(addr))


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def send_all(sock, payload):
    """Send PAYLOAD on SOCK, half-close, and return everything read until EOF."""
    reply = bytearray()

    def reader():
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return
            reply.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    t.join(30)
    sock.close()
    return bytes(reply)


def v2_inet(family, src, sport, dst, dport):
    """A version 2 TCP header, spelled out field by field."""
    fam = b"\x11" if family == socket.AF_INET else b"\x21"
    block = (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
             + struct.pack(">HH", sport, dport))
    return SIG + b"\x21" + fam + struct.pack(">H", len(block)) + block


def expected_inet(version, family, src, sport, dst, dport):
    if version == 1:
        return ("PROXY %s %s %s %d %d\r\n" % ("TCP4" if family == socket.AF_INET else "TCP6",
                                              src, dst, sport, dport)).encode()
    return v2_inet(family, src, sport, dst, dport)


def local_ports_towards(pid, remote_port):
    """The local ports of process PID's TCP sockets connected to REMOTE_PORT."""
    fds = "/proc/%d/fd" % pid
    inodes = set()
    for fd in os.listdir(fds):
        try:
            link = os.readlink(os.path.join(fds, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[9] in inodes and int(parts[2].rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def start_e_chain(procs, keyfile, target, version, e_source, extra=()):
    """Our -e --proxy-protocol VERSION on E_SOURCE -> C -d -> TARGET (an address); our -e."""
    e, _ = procs.chain(target, keyfile, "ours", "c", e_source=e_source,
                       e_extra=("--proxy-protocol", str(version), *extra))
    return e


@need_c
@pytest.mark.parametrize("version", [1, 2])
def test_e_header_names_the_client_through_c_d(procs, keyfile, recorder, version):
    target = recorder()
    e_source = tcp_addr(free_port())
    e = start_e_chain(procs, keyfile, target.addr, version, e_source, ("--log-connections",))
    payloads = [os.urandom(n) for n in (1, 300000, 5000)]
    for i, payload in enumerate(payloads):
        sock = connect(e_source)
        client_port = sock.getsockname()[1]
        assert send_all(sock, payload) == b"done"
        header = expected_inet(version, socket.AF_INET, "127.0.0.1", client_port,
                               "127.0.0.1", port_of(e_source))
        assert target.received(i) == header + payload
        # The header counts in the statistics like the data behind it.
        line = "connection %d: closed: %d bytes in, 4 bytes out" % (i + 1, len(header) + len(payload))
        assert wait_for(lambda: line in e.log_text()), e.log_text()


@need_c
@pytest.mark.skipif(not have_ipv6(), reason="no IPv6 loopback")
@pytest.mark.parametrize("version", [1, 2])
def test_e_header_ipv6_client(procs, keyfile, recorder, version):
    target = recorder()
    e_source = tcp_addr(free_port("::1"), "::1")
    start_e_chain(procs, keyfile, target.addr, version, e_source)
    sock = connect(e_source)
    client_port = sock.getsockname()[1]
    assert send_all(sock, b"over six") == b"done"
    assert target.received() == expected_inet(
        version, socket.AF_INET6, "::1", client_port, "::1", port_of(e_source)) + b"over six"


@need_c
@pytest.mark.parametrize("version", [1, 2])
def test_e_header_unix_client(procs, keyfile, recorder, tmp_path, version):
    target = recorder()
    e_source = str(tmp_path / "e.sock")
    start_e_chain(procs, keyfile, target.addr, version, e_source)
    assert send_all(connect(e_source), b"local") == b"done"
    if version == 1:
        header = b"PROXY UNKNOWN\r\n"
    else:  # the client's unnamed socket, then the path it connected to
        path = e_source.encode()
        header = SIG + bytes.fromhex("21 31 00d8") + bytes(108) + path + bytes(108 - len(path))
    assert target.received() == header + b"local"


@need_c
@pytest.mark.parametrize("version", [1, 2])
def test_d_header_names_the_e_host(procs, keyfile, recorder, version):
    target = recorder()
    c_e, d = procs.chain(target.addr, keyfile, "c", "ours",
                         d_extra=("--proxy-protocol", str(version)))
    d_source = d.addr
    sock = connect(c_e.addr)
    client_port = sock.getsockname()[1]
    sock.sendall(b"first")
    assert wait_for(lambda: (target.received() or b"").endswith(b"first"))
    got = target.received()
    if version == 2:
        e_port = struct.unpack(">H", got[24:26])[0]
    else:
        e_port = int(got.split(b" ")[4])
    header = expected_inet(version, socket.AF_INET, "127.0.0.1", e_port,
                           "127.0.0.1", port_of(d_source))
    assert got == header + b"first"
    assert e_port != client_port
    # The source port named is that of the C -e's connection to us.
    assert e_port in local_ports_towards(c_e.pid, port_of(d_source))
    assert send_all(sock, b" and last") == b"done"
    assert target.received() == header + b"first and last"


@need_c
def test_d_header_unix_source(procs, keyfile, recorder, tmp_path):
    target = recorder()
    d_source = str(tmp_path / "d.sock")
    e, _ = procs.chain(target.addr, keyfile, "c", "ours", d_source=d_source,
                       d_extra=("--proxy-protocol", "2"))
    assert send_all(connect(e.addr), b"x") == b"done"
    path = d_source.encode()
    assert target.received() == (SIG + bytes.fromhex("21 31 00d8") + bytes(108)
                                 + path + bytes(108 - len(path)) + b"x")


# -- a real PROXY-protocol server: nginx ---------------------------------------

NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin")

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    log_format who '$proxy_protocol_addr:$proxy_protocol_port "$request" $status';
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        access_log {dir}/access.log who;
        default_type text/plain;
        location / {{ return 200 "hello\\n"; }}
    }}
}}
"""


class Nginx:
    """An nginx of the test's own: one process, files in DIR, PROXY protocol required."""

    def __init__(self, procs, folder):
        folder.mkdir()
        port = free_port()
        conf = folder / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=folder, port=port))
        self.addr = tcp_addr(port)
        self.access_log = folder / "access.log"
        procs.daemon([NGINX, "-p", "%s/" % folder, "-c", str(conf),
                      "-e", str(folder / "error.log")], self.addr, name="nginx")

    def logged(self, line):
        """True once LINE is in the access log."""
        try:
            return line in self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return False


@pytest.fixture
def nginx(procs, tmp_path):
    if NGINX is None:
        unavailable("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
    return Nginx(procs, tmp_path / "nginx")


def http_get(sock, path):
    reply = send_all(sock, b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"\r\n\r\nhello\n"), reply


@need_c
@pytest.mark.parametrize("version, host", [(1, "127.0.0.1"), (2, "127.0.0.1"), (1, "::1"),
                                           (2, "::1")])
def test_nginx_logs_the_client_of_our_e(procs, keyfile, nginx, version, host):
    if ":" in host and not have_ipv6():
        pytest.skip("no IPv6 loopback")
    e_source = tcp_addr(free_port(host), host)
    start_e_chain(procs, keyfile, nginx.addr, version, e_source)
    for n in range(2):
        sock = connect(e_source)
        client_port = sock.getsockname()[1]
        http_get(sock, "/v%d/%d" % (version, n))
        line = '%s:%d "GET /v%d/%d HTTP/1.0" 200' % (host, client_port, version, n)
        assert wait_for(lambda: nginx.logged(line)), nginx.access_log.read_text()


@need_c
def test_nginx_logs_the_c_e_host_of_our_d(procs, keyfile, nginx):
    c_e, d = procs.chain(nginx.addr, keyfile, "c", "ours", d_extra=("--proxy-protocol", "2"))
    d_source = d.addr
    sock = connect(c_e.addr)
    sock.sendall(b"GET /from-c HTTP/1.0\r\n")  # the request stays open meanwhile
    ports = wait_for(lambda: local_ports_towards(c_e.pid, port_of(d_source)))
    assert len(ports) == 1
    reply = send_all(sock, b"\r\n")
    assert reply.endswith(b"hello\n"), reply
    line = '127.0.0.1:%d "GET /from-c HTTP/1.0" 200' % ports.pop()
    assert wait_for(lambda: nginx.logged(line)), nginx.access_log.read_text()


# -- command line ----------------------------------------------------------------


def run_ours(*args):
    return subprocess.run(ours(*args), stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


@pytest.mark.parametrize("value", ["0", "3", "v2", "", "1.0"])
def test_bad_proxy_protocol_value(keyfile, value):
    r = run_ours("-e", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k", keyfile,
                 "--proxy-protocol", value)
    assert r.returncode == 1
    assert r.stderr.decode() == ("spiped: --proxy-protocol: must be 1 or 2: %s\n%s"
                                 % (value, spiped.SPIPED_USAGE))


def test_connect_after_auth_needs_d(keyfile):
    r = run_ours("-e", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k", keyfile,
                 "--connect-after-auth")
    assert r.returncode == 1
    assert r.stderr.decode() == "spiped: --connect-after-auth: needs -d\n" + spiped.SPIPED_USAGE


@pytest.mark.parametrize("option", [("--proxy-protocol", "1"), ("--connect-after-auth",)])
def test_spipe_has_neither_option(keyfile, option):
    r = subprocess.run(ours_spipe("-t", "[127.0.0.1]:2", "-k", keyfile, *option),
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith(b"spipe: illegal option -- %s\nusage: spipe" % option[0].encode())


def test_help_lists_both():
    out = run_ours("--help").stdout
    assert b"--proxy-protocol 1|2" in out and b"--connect-after-auth" in out

# -- --connect-after-auth ---------------------------------------------------------


def scan(addr, how):
    """A client without the key: connect, maybe send something, read until closed."""
    sock = connect(addr)
    try:
        if how == "garbage-handshake":  # a nonce and a DH message with a wrong MAC
            sock.sendall(os.urandom(32 + 288))
        elif how == "garbage":
            sock.sendall(os.urandom(1 + os.urandom(1)[0]))
            sock.shutdown(socket.SHUT_WR)
        if how != "connect-close":
            while sock.recv(65536):
                pass
    except OSError:
        pass  # a reset is as good as a close
    finally:
        sock.close()


def keyless_clients(procs, d_source, otherkey, count):
    """COUNT clients without the right key: wrong-key spipe and spiped -e, raw scanners."""
    e_source = procs.spiped("-e", d_source, otherkey, impl="c").addr
    kinds = ["spipe", "spiped-e", "connect-close", "garbage-handshake", "garbage"]
    spipes, threads = [], []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "spipe":
            spipes.append(procs.start([C_SPIPE, "-t", d_source, "-k", otherkey],
                                      stdin=subprocess.PIPE))
            spipes[-1].stdin.write(b"let me in")
            spipes[-1].stdin.close()
            spipes[-1].stdin = None
        else:
            args = (e_source, "garbage") if kind == "spiped-e" else (d_source, kind)
            threads.append(threading.Thread(target=scan, args=args, daemon=True))
            threads[-1].start()
    for p in spipes:
        assert p.wait(timeout=30) == 1
    for t in threads:
        t.join(30)
        assert not t.is_alive()


@need_c
def test_connect_after_auth_keyless_clients_never_reach_the_target(
        procs, keyfile, otherkey, echo):
    target = echo()
    d = procs.spiped("-d", target.addr, keyfile, "-o", "3", "--connect-after-auth",
                     "--log-connections")
    d_source = d.addr
    keyless_clients(procs, d_source, otherkey, 40)
    # Every one of the 40 has been through the -d and failed its handshake.
    assert wait_for(lambda: d.log_text().count("handshake failed") == 40, timeout=30), \
        d.log_text()
    assert target.connections == 0
    r = subprocess.run([C_SPIPE, "-t", d_source, "-k", keyfile], input=b"with the key",
                       capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, b"with the key")
    assert target.connections == 1


@need_c
def test_without_connect_after_auth_keyless_clients_reach_the_target(
        procs, keyfile, otherkey, echo):
    """The control: C's behaviour, a target connection for every client."""
    target = echo()
    d_source = procs.spiped("-d", target.addr, keyfile).addr
    keyless_clients(procs, d_source, otherkey, 10)
    assert wait_for(lambda: target.connections == 10), target.connections


@need_c
def test_connect_after_auth_with_proxy_header(procs, keyfile, recorder):
    target = recorder()
    d_source = procs.spiped("-d", target.addr, keyfile, "--connect-after-auth",
                            "--proxy-protocol", "1").addr
    r = subprocess.run([C_SPIPE, "-t", d_source, "-k", keyfile], input=b"hi",
                       capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, b"done")
    assert target.received().startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert target.received().endswith(b" %d\r\nhi" % port_of(d_source))


@need_c
def test_connect_after_auth_refused_target_drops_the_client(procs, keyfile):
    d_source = procs.spiped("-d", tcp_addr(free_port()), keyfile, "--connect-after-auth").addr
    r = subprocess.run([C_SPIPE, "-t", d_source, "-k", keyfile], input=b"hi",
                       capture_output=True, timeout=30)
    assert r.returncode == 1 and r.stdout == b""
