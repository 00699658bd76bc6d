"""--keepalive IDLE[,INTERVAL[,COUNT]]: TCP keepalive timers on both sockets of a connection."""
import ctypes
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from conftest import need_c, ours, recv_exact, unavailable

import spiped

TIMERS = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


def timers(sock):
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            tuple(sock.getsockopt(socket.IPPROTO_TCP, o) for o in TIMERS))


@pytest.mark.parametrize("text, value", [("7", (7, 7, 3)), ("7,3", (7, 3, 3)),
                                         ("7,3,2", (7, 3, 2)), ("32767,1,127", (32767, 1, 127))])
def test_values_and_defaults(keyfile, text, value):
    options = spiped.parse_spiped_args(["-e", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2",
                                        "-k", keyfile, "--keepalive", text])
    assert options.tunnel.keepalive_timers == value and options.tunnel.keepalive


NOT_SECONDS = "not IDLE[,INTERVAL[,COUNT]] in whole seconds"
OUT_OF_RANGE = "IDLE and INTERVAL must be 1 to 32767, COUNT 1 to 127"


@pytest.mark.parametrize("text, why", [
    ("0", OUT_OF_RANGE), ("-1", NOT_SECONDS), ("1.5", NOT_SECONDS), ("x", NOT_SECONDS),
    ("", NOT_SECONDS), ("1,2,3,4", NOT_SECONDS), ("1,,2", NOT_SECONDS), ("1,0", OUT_OF_RANGE),
    ("32768", OUT_OF_RANGE), ("1,1,128", OUT_OF_RANGE), (" 1", NOT_SECONDS),
    ("+1", NOT_SECONDS)])
def test_bad_values_say_why(keyfile, text, why):
    p = subprocess.run(ours("-e", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k", keyfile,
                            "--keepalive", text), capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert p.stderr == "spiped: --keepalive: %s: %s\n%s" % (why, text, spiped.SPIPED_USAGE)


def test_j_with_keepalive_is_a_usage_error(keyfile):
    p = subprocess.run(ours("-e", "-j", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k",
                            keyfile, "--keepalive", "5"), capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1
    assert p.stderr == ("spiped: --keepalive: cannot go with -j, which turns keepalive off\n"
                        + spiped.SPIPED_USAGE)


def test_allowed_on_a_config_line(tmp_path, keyfile):
    conf = tmp_path / "spiped.conf"
    conf.write_text("-e -s [127.0.0.1]:1 -t [127.0.0.1]:2 -k %s --keepalive 30,5\n" % keyfile)
    [(line, options)] = spiped.parse_config_file(str(conf))
    assert options.keepalive_timers == (30, 5, 3)


def test_linux_copies_the_timers_to_accepted_sockets():
    """What Server relies on: tune_socket() on the listener reaches every accepted socket."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        spiped.tune_socket(listener, True, (7, 3, 2))
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert timers(accepted) == (1, (7, 3, 2))


def test_user_timeout_is_as_long_as_keepalive_takes():
    """IDLE + INTERVAL x COUNT seconds: data left unacknowledged (where keepalive
    sends no probe) or a peer's shut window is given up as late as a silent peer."""
    assert spiped.user_timeout_ms((7, 3, 2)) == 13000
    assert spiped.user_timeout_ms((60, 10, 3)) == 90000


def test_linux_copies_the_user_timeout_to_accepted_sockets():
    with socket.socket() as listener, socket.socket() as plain:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        spiped.tune_socket(listener, True, (7, 3, 2))
        spiped.tune_socket(plain, True)
        assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 13000


def _tunnel(procs, keyfile, echo, times, *extra):
    """Ours -e --keepalive TIMES -> C -d -> echo; (our -e, its source, C's port)."""
    e, d = procs.chain(echo().addr, keyfile, "ours", "c", e_extra=("--keepalive", times, *extra))
    return e, e.addr, int(d.addr.rsplit(":", 1)[1])


def _held(source):
    """A client connection through the tunnel that has carried one echo."""
    client = socket.create_connection(("127.0.0.1", int(source.rsplit(":", 1)[1])), timeout=20)
    client.sendall(b"ping")
    assert recv_exact(client, 4) == b"ping"
    return client


def _their_sockets(pid, source_port, c_port):
    """Copies (pidfd_getfd) of PID's accepted socket on SOURCE_PORT and its socket to C_PORT."""
    libc = ctypes.CDLL(None, use_errno=True)
    found = {}
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir("/proc/%d/fd" % pid):
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                unavailable("pidfd_getfd: %s" % os.strerror(ctypes.get_errno()))
            sock = _tcp_socket(fd)
            if sock is None:
                continue
            if sock.getsockname()[1] == source_port and "accepted" not in found:
                found["accepted"] = sock
            elif sock.getpeername()[1] == c_port and "dialled" not in found:
                found["dialled"] = sock
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def _tcp_socket(fd):
    """A socket object for FD if it is a connected TCP socket; else FD is closed, None."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    try:
        if sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET:
            sock.getpeername()
            return sock
    except OSError:
        pass
    sock.close()
    return None


@need_c
def test_both_sockets_of_a_connection_get_the_timers(procs, keyfile, echo):
    if not hasattr(os, "pidfd_open"):
        unavailable("os.pidfd_open needs Python 3.9 on Linux 5.3")
    daemon, source, c_port = _tunnel(procs, keyfile, echo, "7,3,2")
    with _held(source):
        found = _their_sockets(daemon.pid, int(source.rsplit(":", 1)[1]), c_port)
        try:
            assert sorted(found) == ["accepted", "dialled"]
            for sock in found.values():
                assert timers(sock) == (1, (7, 3, 2))
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 13000
        finally:
            for sock in found.values():
                sock.close()


def _ss_keepalive_seconds(*filter_words):
    """Remaining keepalive times (seconds) that ss shows for established sockets matching."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", *filter_words],
                         capture_output=True, text=True, timeout=30).stdout
    units = {"ms": 1, "sec": 1, "s": 1, "min": 60, "h": 3600}  # iproute2 6.1 says "ms" for s
    seconds = []
    for number, unit in re.findall(r"timer:\(keepalive,([\d.]+)([a-z]+)", out):
        seconds.append(float(number) * units.get(unit, 86400))
    return seconds


@need_c
def test_ss_shows_keepalive_timers_on_both_sockets(procs, keyfile, echo):
    if shutil.which("ss") is None:
        unavailable("ss is missing (apt-get install iproute2)")
    daemon, source, c_port = _tunnel(procs, keyfile, echo, "7,3,2")
    with _held(source):
        accepted = _ss_keepalive_seconds("( sport = :%s )" % source.rsplit(":", 1)[1])
        dialled = _ss_keepalive_seconds("( dport = :%d )" % c_port)
        assert len(accepted) == 1 and 0 < accepted[0] <= 7, accepted
        assert len(dialled) == 1 and 0 < dialled[0] <= 7, dialled


def _iptables(action, port, direction):
    return subprocess.run(["iptables", "-w", "10", action, "OUTPUT", "-o", "lo", "-p", "tcp",
                           direction, str(port), "-m", "comment", "--comment",
                           "spiped-test-keepalive", "-j", "DROP"],
                          capture_output=True, text=True, timeout=30)


@need_c
def test_a_dead_peer_ends_the_connection(procs, keyfile, echo):
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("needs root and iptables to drop the C peer's packets")
    daemon, source, c_port = _tunnel(procs, keyfile, echo, "1,1,2", "--log-connections")
    client = _held(source)
    rules = []
    try:
        for direction in ("--dport", "--sport"):
            p = _iptables("-I", c_port, direction)
            if p.returncode != 0:
                pytest.skip("iptables cannot add a rule here: %s" % p.stderr.strip())
            rules.append(direction)
        started = time.monotonic()
        client.settimeout(20)
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass
        elapsed = time.monotonic() - started
    finally:
        for direction in rules:
            _iptables("-D", c_port, direction)
        client.close()
    assert 2 <= elapsed <= 10, elapsed  # IDLE 1 + INTERVAL 1 x COUNT 2, about 3 s
    daemon.kill()
    daemon.wait(timeout=10)
    log = daemon.log_text()
    assert re.search(r"connection 1: dropped \(Connection timed out\)", log), log


def test_bad_value_on_a_config_line_names_it(tmp_path, keyfile):
    conf = tmp_path / "spiped.conf"
    conf.write_text("-e -s [127.0.0.1]:1 -t [127.0.0.1]:2 -k %s --keepalive 5,x\n" % keyfile)
    p = subprocess.run(ours("--check", "-F", "--config", str(conf)), capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 1
    assert p.stderr == "spiped: %s:1: --keepalive: %s: 5,x\n" % (conf, NOT_SECONDS)


def test_help_describes_both_options():
    p = subprocess.run(ours("--help"), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0
    assert "--keepalive IDLE[,INTERVAL[,COUNT]]" in p.stdout and "  --check " in p.stdout
