"""spiped --config FILE: many tunnels in one process, reloaded on SIGHUP.

The far ends are C spiped (/usr/bin/spiped).  Every daemon runs with -F and
its stderr goes to a file; the tests wait on that file and on /proc/net.
"""
import os
import shutil
import signal
import stat
import socket
import subprocess

import pytest

from conftest import (SPIPED_PY, address_listening, connect, exchange, free_port, need_c, ours,
                      read_text, recv_all, refused, rss_kib, tcp_addr, terminate, wait_for,
                      wait_listening)
import spiped


# -- helpers ------------------------------------------------------------------


def new_key(path):
    with open(path, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(path, 0o600)
    return str(path)


def write_config(path, lines):
    with open(path, "w") as f:
        f.write("# tunnels of this test\n\n" + "".join(line + "\n" for line in lines))
    return str(path)


def wait_log(path, needle, timeout=15.0):
    """The log at PATH once it contains NEEDLE."""
    text = wait_for(lambda: needle in read_text(path) and read_text(path), timeout)
    assert text, "%r not in %s, which holds:\n%s" % (needle, path, read_text(path))
    return text


def start_config(procs, conf, *extra):
    """Our spiped --config CONF -F EXTRA as a Daemon, once every source listens."""
    sources = [options.source for _, options in spiped.parse_config_file(conf)]
    return procs.daemon(ours("--config", conf, "-F", *extra), *sources, name="config")


# -- parsing and the difference (no processes) --------------------------------


def test_parse_config_file_lines_comments_quotes(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("# comment\n\n   \n"
                    "-e -s '[127.0.0.1]:1' -t [127.0.0.1]:2 -k %s  # trailing comment\n"
                    "-d -s \"/tmp/a b\" -t [127.0.0.1]:3 -k %s -n5 -o 2 -j\n" % (keyfile, keyfile))
    lines = spiped.parse_config_file(str(conf))
    assert [n for n, _ in lines] == [4, 5]
    assert lines[0][1].source == "[127.0.0.1]:1" and not lines[0][1].decrypt
    assert lines[1][1].source == "/tmp/a b" and lines[1][1].max_connections == 5
    assert lines[1][1].timeout == 2.0 and lines[1][1].decrypt and not lines[1][1].keepalive


@pytest.mark.parametrize("option", ["-F", "-D", "-p x.pid", "-u nobody", "--syslog",
                                    "--drain-timeout 1", "--config other", "-v", "--help",
                                    "-eF"])
def test_process_option_on_a_line_is_an_error(tmp_path, keyfile, option, capsys):
    conf = tmp_path / "c.conf"
    conf.write_text("-e -s [127.0.0.1]:1 -t [127.0.0.1]:2 -k %s\n"
                    "%s -e -s [127.0.0.1]:3 -t [127.0.0.1]:2 -k %s\n" % (keyfile, option, keyfile))
    with pytest.raises(spiped.SpipedError) as e:
        spiped.parse_config_file(str(conf))
    name = option.split()[0] if option != "-eF" else "-F"
    assert e.value.lines[0] == ("%s:2: %s belongs on the command line, not on a tunnel line"
                                % (conf, name))
    assert capsys.readouterr() == ("", "")  # -v and --help print nothing from a line


TUNNEL = "-s [127.0.0.1]:1 -t [127.0.0.1]:2 -k K"


@pytest.mark.parametrize("line, why", [
    ("-e -s [127.0.0.1]:1 -t [127.0.0.1]:2", "missing -k"),
    ("-e -s [127.0.0.1]:1", "missing -t and -k"),
    ("-e -j", "missing -s, -t and -k"),
    (TUNNEL, "give -e (encrypt) or -d (decrypt)"),
    ("-e -d " + TUNNEL, "give -e or -d, not both"),
    ("-d -e " + TUNNEL, "give -e or -d, not both"),
    ("-e -k a -k b -s [127.0.0.1]:1 -t [127.0.0.1]:2", "-k: given more than once"),
    ("-e -e " + TUNNEL, "-e: given more than once"),
    ("-ejj " + TUNNEL, "-j: given more than once"),
    ("-e -f -g " + TUNNEL, "-f and -g exclude each other"),
    ("-e -r 5 -R " + TUNNEL, "-R (never look the target up again) cannot go with -r 5"),
    ("-e -o nan " + TUNNEL, "-o: not a number of seconds: nan"),
    ("-e -r nan -R " + TUNNEL, "-R (never look the target up again) cannot go with -r nan"),
    ("-e " + TUNNEL + " extra", "unexpected argument: extra"),
    ("-e " + TUNNEL + " --accept-key K2", "--accept-key: needs -d"),
    ("-e " + TUNNEL + " --connect-after-auth", "--connect-after-auth: needs -d"),
    ("-e " + TUNNEL + " --proxy-protocol 3", "--proxy-protocol: must be 1 or 2: 3"),
    ("-e " + TUNNEL + " --all-addresses --all-addresses", "--all-addresses: given more than once"),
    ("-e " + TUNNEL + " -n x", "Error parsing argument: -n x: Invalid argument"),
    ("-e -s '[127.0.0.1]:1 -t [127.0.0.1]:2 -k K", "No closing quotation"),
    ("-e " + TUNNEL + " --bogus", "illegal option -- --bogus"),
    ("-e " + TUNNEL + " -x", "illegal option -- -x"),
    ("-e " + TUNNEL + " -o", "Missing argument to -o"),
    ("-d " + TUNNEL + " --accept-key -", "a key from stdin (-) cannot be read again at a reload;"
                                         " name a key file"),
])
def test_bad_line_names_file_and_line(tmp_path, line, why):
    """Every bad line says FILE:LINE and what is wrong with it."""
    conf = tmp_path / "c.conf"
    conf.write_text("# first\n" + line + "\n")
    with pytest.raises(spiped.SpipedError) as e:
        spiped.parse_config_file(str(conf))
    assert e.value.lines == ("%s:2: %s" % (conf, why),)


def test_load_config_checks_keys_addresses_duplicates(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    good = "-e -s [127.0.0.1]:%d -t [127.0.0.1]:2 -k %s"
    for bad, why in (("-e -s [127.0.0.1]:5 -t [127.0.0.1]:2 -k %s" % (tmp_path / "nokey"),
                      "Cannot open file"),
                     ("-e -s [127.0.0.1]:1 -t [127.0.0.1]:9 -k %s" % keyfile,
                      "source [127.0.0.1]:1 is already used on line 1"),
                     ("-e -s [127.0.0.1]:6 -t [1.2.3]:2 -k %s" % keyfile,
                      "Error parsing IP address")):
        conf.write_text(good % (1, keyfile) + "\n" + bad + "\n")
        with pytest.raises(spiped.SpipedError) as e:
            spiped.ConfigFile(str(conf)).load()
        assert e.value.lines[0].startswith("%s:2: " % conf) and why in e.value.lines[0]
    conf.write_text(good % (1, keyfile) + "\n" + good % (2, keyfile) + "\n")
    specs = spiped.ConfigFile(str(conf)).load()
    assert sorted(specs) == ["[127.0.0.1]:1", "[127.0.0.1]:2"]
    assert specs["[127.0.0.1]:2"].line == 2


def test_diff_tunnels():
    def line(source, **changes):
        fields = dict(decrypt=False, source=source, target="T", key="ka")
        return spiped.TunnelOptions(**dict(fields, **changes))

    old = {"A": (line("A"), b"k1"), "B": (line("B"), b"k1"), "C": (line("C"), b"k1"),
           "D": (line("D"), b"k1"), "E": (line("E"), b"k1")}
    new = {"A": (line("A"), b"k1"),                             # unchanged
           "B": (line("B"), b"k2"),                             # key file content
           "C": (line("C", key="kc"), b"k1"),                   # -k path only
           "D": (line("D", max_connections=5), b"k1"),          # anything else
           "F": (line("F"), b"k1")}                             # new line
    added, removed, rekeyed, replaced = spiped.diff_tunnels(old, new)
    assert added == ["F"] and removed == ["E"]
    assert rekeyed == ["B", "C"] and replaced == ["D"]
    assert spiped.diff_tunnels(new, new) == ([], [], [], [])


def test_config_command_line(tmp_path, keyfile, procs):
    """With --config the command line holds only process options."""
    conf = write_config(tmp_path / "c.conf", [
        "-e -s [127.0.0.1]:%d -t [127.0.0.1]:2 -k %s" % (free_port(), keyfile)])
    for extra in (["-e"], ["-k", keyfile], ["-s", "[127.0.0.1]:1"], ["-n", "4"]):
        p = procs.start(ours("--config", conf, "-F", *extra))
        _, err = p.communicate(timeout=30)
        assert p.returncode == 1
        assert err.startswith(b"spiped: --config: tunnel options belong in the file, not on"
                              b" the command line: %s\nusage: spiped" % extra[0].encode()), err
    out = procs.start(ours("--help"), stdout=-1).communicate(timeout=30)[0]
    assert b"--config FILE" in out and b"FILE.pid" in out


# -- a running process ---------------------------------------------------------


@need_c
@pytest.mark.timeout(120)
def test_six_tunnels_carry_data_and_rss(procs, echo, keyfile, tmp_path):
    """-e and -d, TCP and unix sources, C peers: data on all six; RSS near one tunnel's."""
    target = echo()
    lines, entries = [], []
    for i in range(3):   # ours -e -> C -d -> echo; one with a unix source
        far = procs.spiped("-d", target.addr, keyfile, impl="c").addr
        source = str(tmp_path / "e.sock") if i == 1 else tcp_addr(free_port())
        lines.append("-e -s %s -t %s -k %s%s" % (source, far, keyfile,
                                                 " --log-connections" if i == 0 else ""))
        entries.append(source)
    for i in range(3):   # C -e -> ours -d -> echo; one with a unix source
        source = str(tmp_path / "d.sock") if i == 1 else tcp_addr(free_port())
        lines.append("-d -s %s -t %s -k %s -n 3" % (source, target.addr, keyfile))
    conf = write_config(tmp_path / "six.conf", lines)
    p = start_config(procs, conf)
    single = procs.spiped("-e", far, keyfile)
    many_kib, one_kib = rss_kib(p.pid), rss_kib(single.pid)
    print("RSS after start: six tunnels %d KiB, one tunnel %d KiB" % (many_kib, one_kib))
    assert 0 < many_kib <= 1.5 * one_kib, (many_kib, one_kib)

    for line in lines[3:]:
        entries.append(procs.spiped("-e", line.split()[2], keyfile, impl="c").addr)
    for n, entry in enumerate(entries):
        payload = os.urandom(100000 + n)
        assert exchange(entry, payload, timeout=30) == payload, "tunnel %d" % n
    assert len(target.received) == 6

    first = lines[0].split()[2]
    text = wait_log(p.log, "%s: connection 1: closed: 100000 bytes in" % first)
    assert "%s: connection 1: accepted from" % first in text
    # The clients saw EOF; each tunnel's teardown may still be under way on a
    # loaded machine, so ask for statistics until every tunnel's newest line
    # shows its one connection ended.
    sources = [line.split()[2] for line in lines]

    def newest_stats():
        newest = {}
        for text_line in p.log_text().splitlines():
            for source in sources:
                if "%s: stats:" % source in text_line:
                    newest[source] = text_line
        return newest

    def all_ended():
        asked = sum(1 for l in p.log_text().splitlines() if ": stats:" in l)
        p.send_signal(signal.SIGUSR1)
        wait_for(lambda: sum(1 for l in p.log_text().splitlines() if ": stats:" in l)
                 >= asked + len(sources), 5)
        newest = newest_stats()
        return all("live=0 total=1 " in newest.get(source, "") for source in sources)

    assert wait_for(all_ended, 20, step=0.2), newest_stats()
    assert terminate(p, timeout=20) == 0
    assert not os.path.exists(str(tmp_path / "e.sock"))
    assert not os.path.exists(str(tmp_path / "d.sock"))


@need_c
@pytest.mark.timeout(120)
def test_sighup_adds_removes_and_rekeys(procs, echo, keyfile, tmp_path):
    target = echo()
    far = procs.spiped("-d", target.addr, keyfile, impl="c").addr
    kb, kb_new = new_key(tmp_path / "kb"), new_key(tmp_path / "kb.new")
    far_b = procs.spiped("-d", target.addr, kb_new, impl="c").addr
    a, b, c = (tcp_addr(free_port()) for _ in range(3))
    unix = str(tmp_path / "gone.sock")
    line_a = "-e -s %s -t %s -k %s" % (a, far, keyfile)
    line_b = "-e -s %s -t %s -k %s" % (b, far_b, kb)
    line_u = "-e -s %s -t %s -k %s" % (unix, far, keyfile)
    conf = write_config(tmp_path / "t.conf", [line_a, line_b, line_u])
    p = start_config(procs, conf)

    # B's key differs from its far end's: its connections are dropped.
    assert exchange(b, b"wrong key", timeout=20) == b""
    # A live transfer through A, half done when A's line goes.
    payload = os.urandom(200000)
    s = connect(a, timeout=30)
    s.sendall(payload[:100000])
    got = bytearray()
    while len(got) < 100000:
        d = s.recv(65536)
        assert d
        got += d

    shutil.copyfile(kb_new, kb)
    write_config(conf, [line_b, "-e -s %s -t %s -k %s" % (c, far, keyfile)])
    p.send_signal(signal.SIGHUP)
    wait_log(p.log, "%s reloaded: 1 added, 2 removed, 1 rekeyed, 0 replaced, 0 unchanged" % conf)
    assert not address_listening(a) and refused(a)
    assert not os.path.exists(unix) and refused(unix)
    wait_listening(c, p)
    assert exchange(c, b"through the new line", timeout=20) == b"through the new line"
    assert exchange(b, b"with the new key", timeout=20) == b"with the new key"

    s.sendall(payload[100000:])
    s.shutdown(socket.SHUT_WR)
    got += recv_all(s)
    s.close()
    assert bytes(got) == payload
    assert p.poll() is None
    assert terminate(p, timeout=20) == 0


@need_c
@pytest.mark.timeout(120)
def test_sighup_replaces_a_changed_line_keeping_its_connections(procs, echo, keyfile, tmp_path):
    target = echo()
    far = procs.spiped("-d", target.addr, keyfile, impl="c").addr
    a = tcp_addr(free_port())
    conf = write_config(tmp_path / "r.conf", ["-e -s %s -t %s -k %s -n 1" % (a, far, keyfile)])
    p = start_config(procs, conf)
    held = connect(a, timeout=30)
    held.sendall(b"first")
    assert held.recv(5) == b"first"
    # -n 1 is full: raise it; the held connection continues on the old server.
    write_config(conf, ["-e -s %s -t %s -k %s -n 2 --log-connections" % (a, far, keyfile)])
    p.send_signal(signal.SIGHUP)
    wait_log(p.log, "reloaded: 0 added, 0 removed, 0 rekeyed, 1 replaced, 0 unchanged")
    assert exchange(a, b"new server", timeout=20) == b"new server"
    wait_log(p.log, "%s: connection 1: closed" % a)
    held.sendall(b"second")
    held.shutdown(socket.SHUT_WR)
    assert held.recv(100) == b"second"
    held.close()
    assert terminate(p, timeout=20) == 0


def test_sighup_socket_mode_change_never_follows_a_swapped_path(procs, keyfile, tmp_path):
    """A changed --socket-mode on a unix line reaches the socket file, but
    only while the path is still that file: a symlink swapped in is left
    alone (and so is what it points to)."""
    sock = str(tmp_path / "t.sock")
    line = "-e -s %s -t %s -k %s --socket-mode %s"
    conf = write_config(tmp_path / "m.conf", [line % (sock, tcp_addr(free_port()), keyfile, "600")])
    p = start_config(procs, conf)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    write_config(conf, [line % (sock, tcp_addr(free_port()), keyfile, "660")])
    p.send_signal(signal.SIGHUP)
    wait_log(p.log, "reloaded: 0 added, 0 removed, 0 rekeyed, 1 replaced")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    # Swap a symlink in at the path; the next mode change must not chmod through it.
    victim = tmp_path / "victim"
    victim.write_text("x")
    os.chmod(victim, 0o600)
    os.rename(sock, str(tmp_path / "moved.sock"))
    os.symlink(str(victim), sock)
    write_config(conf, [line % (sock, tcp_addr(free_port()), keyfile, "666")])
    p.send_signal(signal.SIGHUP)
    assert wait_for(lambda: p.log_text().count("1 replaced") == 2, 15), p.log_text()
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    assert terminate(p, timeout=20) == 0


@need_c
@pytest.mark.timeout(120)
def test_accept_key_on_a_tunnel_line_and_its_removal_at_reload(procs, echo, keyfile, tmp_path):
    """-d with --accept-key: C clients with either key get through; dropping it rekeys."""
    target = echo()
    old = new_key(tmp_path / "old.key")
    a = tcp_addr(free_port())
    line = "-d -s %s -t %s -k %s" % (a, target.addr, keyfile)
    conf = write_config(tmp_path / "k.conf", [line + " --accept-key " + old])
    p = start_config(procs, conf)
    with_new = procs.spiped("-e", a, keyfile, impl="c").addr
    with_old = procs.spiped("-e", a, old, impl="c").addr
    assert exchange(with_new, b"new key", timeout=20) == b"new key"
    assert exchange(with_old, b"old key", timeout=20) == b"old key"
    write_config(conf, [line])
    p.send_signal(signal.SIGHUP)
    wait_log(p.log, "reloaded: 0 added, 0 removed, 1 rekeyed, 0 replaced, 0 unchanged")
    assert exchange(with_old, b"old key", timeout=20) == b""
    assert exchange(with_new, b"new key again", timeout=20) == b"new key again"
    p.send_signal(signal.SIGUSR1)
    text = wait_log(p.log, "%s: stats:" % a)
    assert "keys=%s=2,old.key=1" % os.path.basename(keyfile) in text
    assert terminate(p, timeout=20) == 0


@need_c
@pytest.mark.timeout(60)
def test_proxy_protocol_on_a_tunnel_line(procs, echo, keyfile, tmp_path):
    """-e with --proxy-protocol 1: the C -d's target first reads a header naming our client."""
    target = echo(mode="sink")
    far = procs.spiped("-d", target.addr, keyfile, impl="c").addr
    port = free_port()
    a = tcp_addr(port)
    conf = write_config(tmp_path / "p.conf", [
        "-e -s %s -t %s -k %s --proxy-protocol 1" % (a, far, keyfile),
        "-e -s %s -t %s -k %s" % (tcp_addr(free_port()), far, keyfile)])
    p = start_config(procs, conf)
    s = connect(a, timeout=20)
    client_port = s.getsockname()[1]
    s.sendall(b"after the header")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(20)
    while s.recv(4096):
        pass
    s.close()
    assert wait_for(lambda: target.received, 20)
    assert target.received[0] == (b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\nafter the header"
                                  % (client_port, port))
    assert terminate(p, timeout=20) == 0


@need_c
@pytest.mark.timeout(60)
def test_sighup_new_source_text_for_the_same_address_takes_over(procs, echo, keyfile, tmp_path):
    """[127.0.0.1]:P rewritten as 127.0.0.1:P: the listener is handed over, not bound twice."""
    target = echo()
    far = procs.spiped("-d", target.addr, keyfile, impl="c").addr
    port = free_port()
    conf = write_config(tmp_path / "n.conf", ["-e -s [127.0.0.1]:%d -t %s -k %s"
                                              % (port, far, keyfile)])
    p = start_config(procs, conf)
    write_config(conf, ["-e -s 127.0.0.1:%d -t %s -k %s" % (port, far, keyfile)])
    p.send_signal(signal.SIGHUP)
    text = wait_log(p.log, "reloaded: 0 added, 0 removed, 0 rekeyed, 1 replaced, 0 unchanged")
    assert "in use" not in text
    assert exchange(tcp_addr(port), b"same address", timeout=20) == b"same address"
    ended = "127.0.0.1:%d: stats: live=0 total=1 " % port

    def stats_show_it_ended():
        # The client may be done a moment before the daemon tore the
        # connection down: ask again until the line says so.
        p.send_signal(signal.SIGUSR1)
        return wait_for(lambda: ended in p.log_text(), 1.0)

    assert wait_for(stats_show_it_ended, 15, step=0.2), p.log_text()
    assert terminate(p, timeout=20) == 0


@need_c
@pytest.mark.timeout(60)
def test_broken_file_at_reload_changes_nothing(procs, echo, keyfile, tmp_path):
    target = echo()
    far = procs.spiped("-d", target.addr, keyfile, impl="c").addr
    a, b = tcp_addr(free_port()), tcp_addr(free_port())
    line_a = "-e -s %s -t %s -k %s" % (a, far, keyfile)
    conf = write_config(tmp_path / "b.conf", [line_a])
    p = start_config(procs, conf)
    # Line 4 (after the two header lines and line_a) names a missing key.
    write_config(conf, [line_a, "-e -s %s -t %s -k %s" % (b, far, tmp_path / "missing")])
    p.send_signal(signal.SIGHUP)
    text = wait_log(p.log, "not reloaded; still serving as before")
    assert "%s:4: Cannot open file: %s" % (conf, tmp_path / "missing") in text
    assert not address_listening(b)
    assert exchange(a, b"still here", timeout=20) == b"still here"
    write_config(conf, [line_a, "-F " + line_a.replace(a, b)])
    p.send_signal(signal.SIGHUP)
    assert wait_for(lambda: p.log_text().count("not reloaded") == 2, 15), p.log_text()
    assert "%s:4: -F belongs on the command line" % conf in p.log_text()
    assert p.poll() is None
    assert terminate(p, timeout=20) == 0


@pytest.mark.parametrize("bad, why", [
    ("-e -s [127.0.0.1]:%(port)d -t [127.0.0.1]:1 -k %(missing)s", "Cannot open file"),
    ("-e -s [127.0.0.1]:%(port)d -t [127.0.0.1]:1 -k %(key)s -p x.pid",
     "-p belongs on the command line"),
    ("-e -s %(unix)s -t [127.0.0.1]:1 -k %(key)s", "source %(unix)s is already used on line 3"),
])
def test_broken_file_at_start_exits_1_before_binding(procs, keyfile, tmp_path, bad, why):
    values = {"port": free_port(), "missing": tmp_path / "missing", "key": keyfile,
              "unix": tmp_path / "first.sock"}
    conf = write_config(tmp_path / "s.conf", [
        "-e -s %s -t [127.0.0.1]:1 -k %s" % (values["unix"], keyfile), bad % values])
    p = procs.start(ours("--config", conf, "-F"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert ("spiped: %s:4: " % conf) in err.decode()
    assert (why % values) in err.decode()
    assert not os.path.exists(values["unix"])   # nothing was bound


def test_missing_file_at_start(procs, tmp_path):
    p = procs.start(ours("--config", str(tmp_path / "none.conf"), "-F"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and b"none.conf: No such file or directory" in err


# -- socket activation ---------------------------------------------------------


def listening_tcp():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(10)
    return s, tcp_addr(s.getsockname()[1])


@need_c
@pytest.mark.timeout(60)
def test_activation_sockets_serve_their_lines(procs, echo, keyfile, tmp_path):
    target = echo()
    far = procs.spiped("-d", target.addr, keyfile, impl="c").addr
    (s1, a1), (s2, a2) = listening_tcp(), listening_tcp()
    a3 = tcp_addr(free_port())
    conf = write_config(tmp_path / "a.conf", [
        "-e -s %s -t %s -k %s" % (a, far, keyfile) for a in (a2, a3, a1)])
    p = procs.activated(ours("--config", conf, "-F"), [s1, s2])
    s1.close()
    s2.close()
    wait_listening(a3, p)
    for a in (a1, a2, a3):
        assert exchange(a, b"via " + a.encode(), timeout=20) == b"via " + a.encode()
    assert terminate(p, timeout=20) == 0


def test_activation_socket_matching_no_line_is_an_error(procs, keyfile, tmp_path):
    (s1, a1), (s2, a2) = listening_tcp(), listening_tcp()
    conf = write_config(tmp_path / "a.conf", ["-e -s %s -t [127.0.0.1]:1 -k %s" % (a1, keyfile)])
    p = procs.activated(ours("--config", conf, "-F"), [s1, s2])
    s1.close()
    s2.close()
    assert p.wait(timeout=30) == 1
    assert ("Inherited file descriptor 4 (%s) is the source of no tunnel in %s" % (a2, conf)
            ) in p.log_text()


# -- contrib -------------------------------------------------------------------

CONTRIB = os.path.join(os.path.dirname(SPIPED_PY), "contrib")


def test_contrib_example_config_parses():
    lines = spiped.parse_config_file(os.path.join(CONTRIB, "systemd", "spiped.conf"))
    assert len(lines) == 3 and {False, True} == {o.decrypt for _, o in lines}


def test_contrib_service_runs_config_with_reload(tmp_path):
    with open(os.path.join(CONTRIB, "systemd", "spiped.service")) as f:
        unit = f.read()
    assert "ExecStart=/usr/local/bin/spiped --config /etc/spiped/spiped.conf -F\n" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in unit
    assert "Type=notify\n" in unit and "NoNewPrivileges=yes\n" in unit
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    fake = tmp_path / "spiped"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copy = tmp_path / "spiped.service"
    copy.write_text(unit.replace("/usr/local/bin/spiped ", str(fake) + " "))
    p = subprocess.run([exe, "verify", "--man=no", str(copy)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), \
        p.stdout + p.stderr


def test_docker_entrypoint_passes_config_without_key(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "spiped"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH="%s:%s" % (bindir, os.environ["PATH"]))
    for first in (["--config", "/etc/t.conf"], ["--config=/etc/t.conf"]):
        out = subprocess.run([os.path.join(CONTRIB, "docker", "docker-entrypoint.sh"),
                              *first, "--drain-timeout", "5"], env=env, capture_output=True,
                             text=True, timeout=30).stdout.split("\n")
        assert out[:-1] == ["-F", *first, "--drain-timeout", "5"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_openrc_tunnels_script_is_clean():
    script = os.path.join(CONTRIB, "openrc", "spiped-tunnels")
    assert os.access(script, os.X_OK)
    with open(script) as f:
        text = f.read()
    assert "--config '$spiped_config' -F" in text and "--signal HUP" in text
    p = subprocess.run(["shellcheck", "--shell=sh", "--exclude=SC2034,SC2154", script],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_empty_key_on_a_line_is_read_at_reload_as_at_start(tmp_path, procs):
    """C's warning at the start; a reload with nothing changed changes nothing and fails nothing."""
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    empty.chmod(0o600)
    addr = tcp_addr(free_port())
    conf = write_config(tmp_path / "c.conf", ["-e -s %s -t [127.0.0.1]:2 -k %s" % (addr, empty)])
    p = start_config(procs, conf)
    wait_log(p.log, "holds only 0 bytes")
    p.send_signal(signal.SIGHUP)
    text = wait_log(p.log, "%s reloaded: 0 added, 0 removed, 0 rekeyed, 0 replaced, 1 unchanged"
                    % conf)
    assert "not reloaded" not in text and "file is empty" not in text, text
    assert terminate(p, timeout=20) == 0


@pytest.mark.parametrize("text", ["", "# only a comment\n\n   \n"], ids=["empty", "comments"])
def test_config_without_tunnels_is_an_error_at_start(tmp_path, procs, text):
    conf = tmp_path / "c.conf"
    conf.write_text(text)
    pidfile = tmp_path / "pid"
    # Without -F too: the error comes before daemonizing (and with -D, before that).
    for extra in ([], ["-D"], ["-F"]):
        r = subprocess.run(ours("--config", str(conf), "-p", str(pidfile), *extra),
                           capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 1, r
        assert r.stderr.decode() == ("spiped: %s: no tunnels: the file holds only blank lines"
                                     " and comments\n" % conf)
        assert not pidfile.exists()


def test_config_emptied_at_reload_keeps_serving(tmp_path, procs, keyfile, echo):
    target = echo()
    addr = tcp_addr(free_port())
    conf = write_config(tmp_path / "c.conf",
                        ["-d -s %s -t %s -k %s" % (addr, target.addr, keyfile)])
    p = start_config(procs, conf)
    write_config(conf, [])
    p.send_signal(signal.SIGHUP)
    text = wait_log(p.log, "%s not reloaded; still serving as before" % conf)
    assert "no tunnels" in text, text
    assert address_listening(addr) and p.poll() is None
    assert terminate(p, timeout=20) == 0


def test_log_label_prefixes_every_line(tmp_path, procs, keyfile, echo):
    """--log-label: one daemon's lines tell themselves apart; tunnel lines keep their source."""
    target = echo()
    addr = tcp_addr(free_port())
    p = procs.spiped("-d", target.addr, keyfile, "--log-connections", "--log-label", "smtp",
                     source=addr)
    exchange(addr, b"no key", timeout=20)  # our nonce comes back, then the end
    wait_log(p.log, "handshake failed")
    lines = p.log_text().splitlines()
    assert lines and all(line.startswith("spiped: smtp: ") for line in lines), lines
    assert "spiped: smtp: connection 1: accepted from" in lines[0], lines
    assert terminate(p, timeout=20) == 0
    conf = write_config(tmp_path / "c.conf", ["-d -s %s -t %s -k %s --log-connections"
                                              % (addr, target.addr, keyfile)])
    p = start_config(procs, conf, "--log-label", "all")
    exchange(addr, b"no key", timeout=20)  # our nonce comes back, then the end
    text = wait_log(p.log, "handshake failed")
    assert "spiped: all: %s: connection 1: accepted from" % addr in text, text
    assert terminate(p, timeout=20) == 0
    bad = write_config(tmp_path / "bad.conf", ["-d -s %s -t %s -k %s --log-label x"
                                               % (addr, target.addr, keyfile)])
    with pytest.raises(spiped.SpipedError) as e:
        spiped.parse_config_file(bad)
    assert "--log-label belongs on the command line" in e.value.lines[0]
