"""spiped --check: a start's checks without binding, daemonizing or serving."""
import os
import socket
import subprocess

from conftest import free_port, ours, tcp_addr

import spiped


def check(*args, cwd=None):
    """Run our spiped --check ARGS; the finished process (text output)."""
    return subprocess.run(ours("--check", *args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=30, cwd=cwd)


def tunnel(source, target, key, *more):
    return ["-e", "-s", source, "-t", target, "-k", key, *more]


def test_check_passes_while_the_source_port_is_held(keyfile, tmp_path, procs):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        source = tcp_addr(holder.getsockname()[1])
        target = tcp_addr(free_port())
        p = check(*tunnel(source, target, keyfile), "-p", str(tmp_path / "pid"))
        assert (p.returncode, p.stdout) == (0, "%s -> %s: ok, 1 key\n" % (source, target))
        assert not os.path.exists(tmp_path / "pid")  # no daemon, no pidfile
        start = procs.start(ours(*tunnel(source, target, keyfile), "-F"))
        assert start.wait(timeout=20) == 1
        assert b"Error binding socket: Address already in use" in start.stderr.read()
    finally:
        holder.close()


def test_check_binds_nothing_and_counts_keys(tmp_path, keyfile, otherkey):
    source = str(tmp_path / "in.sock")
    p = check("-F", "-d", "-s", source, "-t", tcp_addr(free_port()), "-k", keyfile,
              "--accept-key", otherkey)
    assert p.returncode == 0, p.stderr
    assert p.stdout.endswith(": ok, 2 keys\n")
    assert not os.path.exists(source)


def test_check_config_prints_each_tunnel(tmp_path, keyfile):
    conf = tmp_path / "spiped.conf"
    lines = [tunnel(tcp_addr(free_port()), tcp_addr(free_port()), keyfile),
             tunnel(str(tmp_path / "b.sock"), tcp_addr(free_port()), keyfile, "--keepalive", "60")]
    conf.write_text("# two tunnels\n" + "".join(" ".join("'%s'" % w for w in l) + "\n"
                                                 for l in lines))
    p = check("-F", "--config", str(conf))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["%s -> %s: ok, 1 key" % (l[2], l[4]) for l in lines]


def test_check_config_errors_name_file_and_line(tmp_path, keyfile):
    conf = tmp_path / "spiped.conf"
    good = " ".join(tunnel(tcp_addr(free_port()), tcp_addr(free_port()), keyfile))
    conf.write_text(good + "\n" + " ".join(tunnel(tcp_addr(free_port()), tcp_addr(free_port()),
                                                  str(tmp_path / "missing"))) + "\n")
    p = check("-F", "--config", str(conf))
    assert p.returncode == 1 and p.stdout == ""
    assert "%s:2: Cannot open file: %s" % (conf, tmp_path / "missing") in p.stderr
    conf.write_text(good + "\n" + good + "\n")
    p = check("-F", "--config", str(conf))
    assert p.returncode == 1 and "%s:2: source" % conf in p.stderr


def test_check_gives_the_starts_warnings(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o644)
    p = check("-F", *tunnel(tcp_addr(free_port()), tcp_addr(free_port()), str(key)))
    assert p.returncode == 0
    assert "readable by group or others" in p.stderr


def test_check_pidfile_folder_must_exist(tmp_path, keyfile):
    args = tunnel(tcp_addr(free_port()), tcp_addr(free_port()), keyfile)
    missing = str(tmp_path / "no" / "pid")
    p = check(*args, "-p", missing)
    assert p.returncode == 1
    assert p.stderr.splitlines() == ["spiped: fopen(%s): No such file or directory" % missing,
                                     "spiped: Failed to daemonize"]
    assert check("-F", *args, "-p", missing).returncode == 0  # -F writes no pidfile


def test_check_resolves_once_even_with_D(keyfile):
    p = check("-D", "-F", *tunnel(tcp_addr(free_port()), "nosuch.invalid:80", keyfile))
    assert p.returncode == 1 and "nosuch.invalid" in p.stderr


def test_check_unix_source_folder_and_user(tmp_path, keyfile):
    target = tcp_addr(free_port())
    p = check("-F", *tunnel(str(tmp_path / "no" / "s.sock"), target, keyfile))
    assert p.returncode == 1
    assert "Error binding socket: No such file or directory" in p.stderr
    p = check("-F", "-u", "nosuch-user-xyz", *tunnel(str(tmp_path / "s.sock"), target, keyfile))
    assert p.returncode == 1 and "No such user: nosuch-user-xyz" in p.stderr


def test_check_unix_source_live_other_or_stale(tmp_path, keyfile, procs):
    target = tcp_addr(free_port())
    other = tmp_path / "file"
    other.write_text("not a socket")
    p = check("-F", *tunnel(str(other), target, keyfile))
    assert p.returncode == 1 and "exists and is not a socket; not removing it" in p.stderr
    live = str(tmp_path / "live.sock")
    procs.daemon(ours("-F", *tunnel(live, target, keyfile)), live)
    p = check("-F", *tunnel(live, target, keyfile))
    assert p.returncode == 1 and "in use by a running process" in p.stderr
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    p = check("-F", *tunnel(stale, target, keyfile))
    assert p.returncode == 0 and "stale socket" in p.stderr
    assert os.path.exists(stale)  # --check leaves it; only a start removes it


def test_check_is_a_process_option(tmp_path, keyfile):
    conf = tmp_path / "spiped.conf"
    conf.write_text("--check " + " ".join(tunnel(tcp_addr(free_port()), tcp_addr(free_port()),
                                                 keyfile)) + "\n")
    p = check("-F", "--config", str(conf))
    assert p.returncode == 1 and "--check belongs on the command line" in p.stderr
    options = spiped.parse_spiped_args(["--check", *tunnel("[127.0.0.1]:1", "[127.0.0.1]:2",
                                                           keyfile)])
    assert options.check and options.tunnel.source == "[127.0.0.1]:1"


def test_creatable():
    assert spiped.creatable("/proc/no/such") == os.strerror(2)
    assert spiped.creatable("/tmp/x-%d" % os.getpid()) is None
    assert spiped.creatable("/tmp", replace=True) == os.strerror(21)
