"""--allow CIDR[,CIDR...]: the TCP peers a tunnel serves; others are closed at accept.

Parsing and matching are checked on spiped.AllowList itself, the refusal
log's limits with a clock of the test's own; whole daemons on loopback
show the close before any byte, the counters, --metrics left open, and a
reload.  Two hosts with different addresses: tests/test_netbed.py.
"""
import ipaddress
import signal
import socket
import subprocess

import pytest

import spiped
from conftest import (connect, drain, exchange, free_port, need_c, ours, read_text, tcp_addr,
                      wait_for, wait_listening)
from test_config import start_config, wait_log, write_config
from test_metrics import metric


def net(text):
    return ipaddress.ip_network(text)


# -- parsing --------------------------------------------------------------------


def tunnel_of(*args):
    return spiped.parse_spiped_args(["-d", "-s", "[0.0.0.0]:1", "-t", "[127.0.0.1]:2",
                                     "-k", "key", *args]).tunnel


@pytest.mark.parametrize("text, networks", [
    ("10.0.0.0/8", ["10.0.0.0/8"]),
    ("10.1.2.3", ["10.1.2.3/32"]),
    ("fd99::1", ["fd99::1/128"]),
    ("10.0.0.0/8,fd99::/64,192.0.2.7", ["10.0.0.0/8", "fd99::/64", "192.0.2.7/32"]),
    ("0.0.0.0/0", ["0.0.0.0/0"]),
])
def test_networks(text, networks):
    assert tunnel_of("--allow", text).allow == tuple(map(net, networks))


def test_repeated_option_adds_up_and_no_option_allows_all():
    assert tunnel_of("--allow", "10.0.0.0/8", "--allow", "::1,192.0.2.0/24").allow == (
        net("10.0.0.0/8"), net("::1/128"), net("192.0.2.0/24"))
    assert tunnel_of().allow == ()


def run_ours(*args):
    return subprocess.run(ours(*args), capture_output=True, text=True, timeout=30)


def d_line(keyfile, source="[127.0.0.1]:1"):
    return ("-d", "-s", source, "-t", "[127.0.0.1]:2", "-k", keyfile)


@pytest.mark.parametrize("text, item", [
    ("", ""), ("x", "x"), ("10.0.0.0/33", "10.0.0.0/33"), ("10.0.0.256", "10.0.0.256"),
    ("10.0.0.0/8,", ""), (" 10.0.0.1", " 10.0.0.1"), ("[::1]", "[::1]"),
    ("fd99::/129", "fd99::/129"), ("10.0.0.0/8;10.1.0.0/16", "10.0.0.0/8;10.1.0.0/16")])
def test_bad_values_say_which_item(keyfile, text, item):
    p = run_ours(*d_line(keyfile), "--allow", text, "--check", "-F")
    assert p.returncode == 1
    assert p.stderr.startswith('spiped: --allow: not an address or a network (CIDR): "%s"\n'
                               % item), p.stderr
    assert "usage: spiped" in p.stderr


@pytest.mark.parametrize("text, meant", [("10.1.2.3/8", "10.0.0.0/8"),
                                         ("fd99::1/64", "fd99::/64")])
def test_host_bits_set_is_a_usage_error(keyfile, text, meant):
    p = run_ours(*d_line(keyfile), "--allow", "192.0.2.0/24," + text)
    assert p.returncode == 1
    assert p.stderr.startswith("spiped: --allow: host bits set in %s (the network is %s)\n"
                               % (text, meant)), p.stderr
    assert "usage: spiped" in p.stderr


def test_unix_source_is_a_usage_error(keyfile, tmp_path):
    p = run_ours(*d_line(keyfile, str(tmp_path / "s.sock")), "--allow", "10.0.0.0/8")
    assert p.returncode == 1
    assert p.stderr.startswith("spiped: --allow: applies to TCP sources, not the unix socket")
    assert "usage: spiped" in p.stderr


def test_check_validates_it_on_config_lines(keyfile, tmp_path):
    conf = tmp_path / "t.conf"
    port = free_port()
    conf.write_text("-d -s [127.0.0.1]:%d -t [127.0.0.1]:2 -k %s --allow 10.0.0.0/8 "
                    "--allow fd99::/64\n" % (port, keyfile))
    p = run_ours("--check", "-F", "--config", str(conf))
    assert (p.returncode, p.stdout) == (0, "[127.0.0.1]:%d -> [127.0.0.1]:2: ok, 1 key\n" % port)
    conf.write_text("-d -s [127.0.0.1]:1 -t [127.0.0.1]:2 -k %s --allow 10.0.0.1/8\n" % keyfile)
    p = run_ours("--check", "-F", "--config", str(conf))
    assert p.returncode == 1
    assert p.stderr == ("spiped: %s:1: --allow: host bits set in 10.0.0.1/8 (the network is"
                        " 10.0.0.0/8)\n" % conf)
    conf.write_text("-d -s [127.0.0.1]:1 -t [127.0.0.1]:2 -k %s --allow ten\n" % keyfile)
    p = run_ours("--check", "-F", "--config", str(conf))
    assert p.returncode == 1
    assert p.stderr == ('spiped: %s:1: --allow: not an address or a network (CIDR): "ten"\n'
                        % conf)


def test_help_describes_it():
    p = run_ours("--help")
    assert p.returncode == 0 and "  --allow CIDR[,CIDR...]" in p.stdout


# -- matching -------------------------------------------------------------------


def allow(*texts):
    return spiped.AllowList(tuple(net(t) for t in texts))


@pytest.mark.parametrize("peer, admitted", [
    (("10.99.1.2", 5000), True),
    (("10.98.1.2", 5000), False),
    (("::ffff:10.99.1.2", 5000, 0, 0), True),     # an IPv4 peer of an IPv6 listener
    (("::ffff:10.98.1.2", 5000, 0, 0), False),
    (("fd99:1::2", 5000, 0, 0), True),
    (("fd99:2::2", 5000, 0, 0), False),
    (("fe80::1%eth0", 5000, 0, 2), True),
    (("::1", 5000, 0, 0), False),
    ("", False),                                   # a unix peer: never
])
def test_the_peer_address_decides(peer, admitted):
    assert allow("10.99.0.0/16", "fd99:1::/64", "fe80::/64").admits(peer) is admitted


# -- the refusal log --------------------------------------------------------------


@pytest.fixture
def events(monkeypatch):
    lines = []
    monkeypatch.setattr(spiped.log, "event", lines.append)
    return lines


def test_a_source_is_logged_once_a_minute(events):
    a = allow("10.0.0.0/8")
    for second in range(0, 60, 5):
        a.refused(("192.0.2.1", 1000 + second), second)
    a.refused(("::ffff:192.0.2.2", 7, 0, 0), 30)
    assert events == ["refused a connection from 192.0.2.1: not in --allow",
                      "refused a connection from 192.0.2.2: not in --allow"]
    a.summarize(60)
    assert events[2:] == ["refused 11 more connections in the last minute, not logged one by one"]
    a.refused(("192.0.2.1", 1), 60.5)
    a.summarize(119)
    assert events[3:] == ["refused a connection from 192.0.2.1: not in --allow"]


def test_many_sources_cost_bounded_lines_and_memory(events):
    a = spiped.AllowList((net("10.0.0.0/8"),), "[::]:22: ")
    for i in range(5000):
        a.refused(("fd00::%x" % i, 1, 0, 0), i * 0.01)   # 5000 sources in 50 s
        assert len(a.logged) <= a.MEMORY
    a.summarize(50)
    assert len(events) == 1024
    a.summarize(60)
    assert len(events) == 1025 and events[-1].startswith("[::]:22: refused 3976 more ")
    # A minute after they were logged the first sources are forgotten: logged again.
    a.refused(("fd00::0", 1, 0, 0), 61)
    assert events[-1] == "[::]:22: refused a connection from fd00::: not in --allow"
    assert len(a.logged) <= a.MEMORY


# -- daemons --------------------------------------------------------------------


@need_c
def test_refused_before_any_byte_and_counted(procs, echo, keyfile, tmp_path):
    """Ours -d --allow 10.0.0.0/8 refuses 127.0.0.1: no byte, no target dial, no slot
    of -n 1 taken, not counted as accepted; counted as refused (--metrics, SIGUSR1)
    and logged once.  --metrics itself answers 127.0.0.1."""
    target = echo()
    source, metrics = tcp_addr(free_port()), tcp_addr(free_port())
    p = procs.spiped("-d", target.addr, keyfile, "-n", "1", "--allow", "10.0.0.0/8",
                     "--metrics", metrics, source=source)
    err = p.log
    wait_listening(metrics, p.proc)
    for _ in range(3):
        s = connect(source)
        s.settimeout(10)
        assert drain(s)[0] == b""
        s.close()
    entry = tcp_addr(free_port())
    procs.spiped("-e", source, keyfile, source=entry, impl="c")
    assert exchange(entry, b"through C", timeout=20) == b""
    assert wait_for(lambda: metric(metrics, "spiped_connections_refused_total", source) == 4)
    assert metric(metrics, "spiped_connections_total", source) == 0
    assert target.connections == 0
    p.send_signal(signal.SIGUSR1)
    line = wait_log(err, "stats:")
    assert " live=0 total=0 " in line and " refused=4" in line, line
    assert read_text(err).count("refused a connection from 127.0.0.1: not in --allow") == 1


@need_c
def test_reload_narrowing_the_list_leaves_live_connections(procs, echo, keyfile, tmp_path):
    target = echo()
    source = tcp_addr(free_port())
    entry = tcp_addr(free_port())
    procs.spiped("-e", source, keyfile, source=entry, impl="c")
    line = "-d -s %s -t %s -k %s --allow %s"
    conf = write_config(tmp_path / "a.conf", [line % (source, target.addr, keyfile, "127.0.0.0/8")])
    p = start_config(procs, conf)
    err = p.log
    held = connect(entry, timeout=30)
    held.sendall(b"before")
    assert held.recv(6) == b"before"
    write_config(conf, [line % (source, target.addr, keyfile, "10.0.0.0/8")])
    p.send_signal(signal.SIGHUP)
    wait_log(err, "reloaded: 0 added, 0 removed, 0 rekeyed, 1 replaced, 0 unchanged")
    assert exchange(entry, b"new", timeout=20) == b""
    wait_log(err, "%s: refused a connection from 127.0.0.1" % source)
    held.sendall(b"after")
    held.shutdown(socket.SHUT_WR)
    assert drain(held)[0] == b"after"
    held.close()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
