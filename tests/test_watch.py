"""--watch: key files (and a --config file) reloaded when they change, no SIGHUP.

FileWatch is tested alone with its looks forced; the daemon is tested with
a Kubernetes-style Secret folder (file -> ..data/file, ..data -> a folder
swapped atomically), a key rewritten in place, a key from stdin, and a
reload that fails.
"""
import itertools
import os
import shutil
import subprocess
import tempfile
import time

import pytest

import spiped
from conftest import (SecretFolder, connect, exchange, free_port, ours, read_text, recv_exact,
                      tcp_addr, wait_for, wrapped)
from test_config import start_config

INTERVAL = "0.2"   # --watch-interval of the daemons here: two looks take 0.4 s


def look(watch):
    """One look now, whatever the time."""
    watch.next_look = 0
    return watch.look()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def replace(path, data):
    """PATH's content becomes DATA in one rename, as a careful writer does."""
    write(path + ".new", data)
    os.rename(path + ".new", path)


# -- FileWatch ----------------------------------------------------------------


def test_nothing_changed_nothing_reported(tmp_path):
    key = str(tmp_path / "key")
    write(key, os.urandom(32))
    watch = spiped.FileWatch(2.0)
    watch.watch([key])
    assert [look(watch) for _ in range(3)] == [[], [], []]


def test_a_rename_is_reported_once_after_one_more_look(tmp_path):
    key = str(tmp_path / "key")
    write(key, os.urandom(32))
    watch = spiped.FileWatch(2.0)
    watch.watch([key])
    replace(key, os.urandom(32))
    assert look(watch) == []          # changed: one more look must find it the same
    assert look(watch) == [key]
    assert look(watch) == []          # reported once
    watch.watch([key])                # the reload read it
    assert look(watch) == []


def test_a_file_still_being_written_is_not_reported(tmp_path):
    key = str(tmp_path / "key")
    write(key, os.urandom(32))
    watch = spiped.FileWatch(2.0)
    watch.watch([key])
    with open(key, "wb") as f:        # rewritten in place, a few bytes between looks
        for _ in range(4):
            f.write(os.urandom(8))
            f.flush()
            assert look(watch) == []
    assert look(watch) == [key]       # the last write, seen twice


def test_a_swapped_secret_folder_is_seen_through_its_links(tmp_path):
    secret = SecretFolder(tmp_path / "secret", "key")
    secret.publish(key=os.urandom(32))
    watch = spiped.FileWatch(2.0)
    watch.watch([secret.path("key")])
    secret.publish(key=os.urandom(32))
    assert look(watch) == []
    assert look(watch) == [secret.path("key")]


def test_a_missing_file_that_appears_is_reported(tmp_path):
    key = str(tmp_path / "key")
    watch = spiped.FileWatch(2.0)
    watch.watch([key])
    assert look(watch) == []
    write(key, b"k" * 32)
    look(watch)
    assert look(watch) == [key]


def test_after_a_report_only_a_new_change_reports_again(tmp_path):
    """A reload that failed rebuilds the same set: no retry until a file changes again."""
    key, other = str(tmp_path / "key"), str(tmp_path / "other")
    write(key, os.urandom(32))
    write(other, os.urandom(32))
    watch = spiped.FileWatch(2.0)
    watch.watch([key, other])
    replace(other, os.urandom(32))
    look(watch)
    assert look(watch) == [other]
    watch.watch([key, other])         # as after the reload (failed or not)
    assert [look(watch) for _ in range(3)] == [[], [], []]
    os.chmod(key, 0o640)              # ctime changes
    look(watch)
    assert look(watch) == [key]


def test_the_next_look_waits_for_the_interval():
    watch = spiped.FileWatch(60.0)
    watch.watch([])
    assert 59 < watch.wait() <= 60
    assert watch.look() == []         # not due: nothing looked at


@pytest.mark.parametrize("args, watch, interval", [
    ([], False, 2.0),
    (["--watch"], True, 2.0),
    (["--watch-interval", "0.5"], True, 0.5),
    (["--watch", "--watch-interval", "7"], True, 7.0),
])
def test_watch_options(args, watch, interval):
    options = spiped.parse_spiped_args(["-d", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2",
                                        "-k", "key", *args])
    assert (options.watch, options.watch_interval) == (watch, interval)


@pytest.mark.parametrize("value", ["0", "inf", "-1", "nan", "soon", "1e400"])
def test_watch_interval_must_be_a_positive_number(value):
    r = subprocess.run(ours("-d", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k", "key",
                            "--watch-interval", value), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith("spiped: --watch-interval: not a number of seconds above 0: %s\n"
                               % value), r.stderr
    assert "usage: spiped" in r.stderr


def test_watch_takes_no_argument():
    r = subprocess.run(ours("-d", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k", "key",
                            "--watch=3"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "usage: spiped" in r.stderr


def test_watch_belongs_on_the_command_line(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("-e -s [127.0.0.1]:1 -t [127.0.0.1]:2 -k %s --watch\n" % keyfile)
    with pytest.raises(spiped.SpipedError) as e:
        spiped.parse_config_file(str(conf))
    assert "--watch belongs on the command line" in e.value.lines[0]


def test_help_lists_watch():
    out = subprocess.run(ours("--help"), capture_output=True, text=True, timeout=30).stdout
    starts = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert "--watch" in starts and "--watch-interval" in starts


# -- the daemon -----------------------------------------------------------------


class Watched:
    """Our spiped -d --watch-interval 0.2 in front of an echo target; its log in a file."""

    def __init__(self, procs, tmp_path, echo, key, *extra, interval=INTERVAL, **kw):
        self.procs, self.tmp_path = procs, tmp_path
        self.clients = itertools.count()
        self.target = echo()
        daemon = procs.spiped("-d", self.target.addr, key, "--watch-interval", interval,
                              "--log-connections", *extra, **kw)
        self.addr, self.log, self.proc = daemon.addr, daemon.log, daemon.proc

    def text(self):
        return read_text(self.log)

    def wait_log(self, what, count=1, timeout=15):
        assert wait_for(lambda: self.text().count(what) >= count, timeout), self.text()

    def client(self, key_bytes):
        """Our spiped -e in front of the daemon, with a key file holding KEY_BYTES."""
        path = str(self.tmp_path / ("client-%d.key" % next(self.clients)))
        write(path, key_bytes)
        addr = tcp_addr(free_port())
        self.procs.spiped("-e", self.addr, path, source=addr)
        return addr


SLOW_SERVE = """
real_serve = spiped.Supervisor.serve
def slow_serve(self, specs, servers):
    time.sleep(1.5)  # bound and listening, not yet serving
    return real_serve(self, specs, servers)
spiped.Supervisor.serve = slow_serve
"""


def test_a_key_replaced_while_the_daemon_starts_is_reloaded(procs, tmp_path, echo):
    """The files are watched as they were read, not as they are once the daemon serves:
    a key replaced after the start read it (the socket listening) is reloaded."""
    key = str(tmp_path / "key")
    write(key, os.urandom(32))
    d = Watched(procs, tmp_path, echo, key, impl=wrapped(tmp_path, SLOW_SERVE))
    replace(key, os.urandom(32))
    d.wait_log("changed: reloading")
    d.wait_log("reloaded 1 key")


def served(addr):
    payload = os.urandom(5000)
    return exchange(addr, payload, timeout=20) == payload


def test_a_swapped_secret_folder_is_reloaded_without_a_signal(procs, tmp_path, echo):
    """The new key is served, the old one refused, a live connection goes on."""
    secret = SecretFolder(tmp_path / "secret", "key")
    old, new = os.urandom(32), os.urandom(32)
    secret.publish(key=old)
    d = Watched(procs, tmp_path, echo, secret.path("key"))
    through_old = d.client(old)
    live = connect(through_old, timeout=20)
    live.sendall(b"before")
    assert recv_exact(live, 6) == b"before"

    secret.publish(key=new)
    d.wait_log("reloaded 1 key")
    assert "%s changed: reloading" % secret.path("key") in d.text(), d.text()
    live.sendall(b"after")
    assert recv_exact(live, 5) == b"after"            # the live connection goes on
    assert served(d.client(new))
    assert not served(through_old)                    # a new connection with the old key
    live.close()
    assert d.proc.poll() is None
    assert d.text().count("reloading") == 1, d.text()


def test_a_key_rewritten_in_place_is_taken_once_complete(procs, tmp_path, echo):
    """While the file grows between looks nothing is reloaded; then the whole file is."""
    key = str(tmp_path / "key")
    write(key, os.urandom(32))
    d = Watched(procs, tmp_path, echo, key, interval="0.5")
    new = os.urandom(160)
    with open(key, "wb") as f:
        for i in range(len(new)):                      # a byte every 10 ms: 1.6 s, three looks
            f.write(new[i:i + 1])
            f.flush()
            time.sleep(0.01)                           # the writer's pace, not a wait
            assert "reloading" not in d.text(), "a half-written key was taken at byte %d" % i
    d.wait_log("reloaded 1 key")
    assert d.text().count("reloading") == 1, d.text()
    assert served(d.client(new))


def test_key_from_stdin_is_not_watched_and_says_so_once(procs, tmp_path, echo):
    d = Watched(procs, tmp_path, echo, "-", input=b"k" * 32)
    d.wait_log("has no file to watch")
    assert served(d.client(b"k" * 32))
    assert d.text().count("--watch: the key read from stdin (-k -) has no file to watch") == 1


def test_a_watched_config_file_adds_its_new_key_files(procs, tmp_path, echo):
    """The watched set is rebuilt after each reload: a key named by a new line is watched too."""
    target = echo()
    first, second = tcp_addr(free_port()), tcp_addr(free_port())
    key1, key2 = str(tmp_path / "one.key"), str(tmp_path / "two.key")
    write(key1, os.urandom(32))
    write(key2, os.urandom(32))
    conf = str(tmp_path / "tunnels.conf")
    line = "-d -s %s -t %s -k %s\n"
    write(conf, (line % (first, target.addr, key1)).encode())
    p = start_config(procs, conf, "--watch-interval", INTERVAL)
    log = p.log
    replace(conf, (line % (first, target.addr, key1) + line % (second, target.addr, key2)).encode())
    assert wait_for(lambda: "reloaded: 1 added" in read_text(log), 15), read_text(log)
    assert "%s changed: reloading" % conf in read_text(log)
    new = os.urandom(32)
    replace(key2, new)
    assert wait_for(lambda: "%s: reloaded 1 key" % second in read_text(log), 15), read_text(log)
    assert "%s changed: reloading" % key2 in read_text(log)
    client = tcp_addr(free_port())
    write(str(tmp_path / "client.key"), new)
    procs.spiped("-e", second, str(tmp_path / "client.key"), source=client)
    assert served(client)
    assert p.poll() is None


@pytest.fixture
def open_folder():
    """A folder every user can search (pytest's tmp_path lies under a root-only one)."""
    path = tempfile.mkdtemp(prefix="spiped-watch-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="-u needs root")
def test_a_failed_reload_warns_once_and_waits_for_the_next_change(procs, tmp_path, echo,
                                                                   open_folder):
    """Under -u a root-only key cannot be read again: one warning, no retry at each look,
    and the next change (the file made readable) is reloaded."""
    key = os.path.join(open_folder, "key")
    old, new = os.urandom(32), os.urandom(32)
    write(key, old)
    d = Watched(procs, tmp_path, echo, key, "-u", "nobody")
    replace(key, new)                                  # root's 0600 file: nobody cannot read it
    d.wait_log("Key reload failed")
    assert "Permission denied after -u nobody" in d.text(), d.text()
    assert not wait_for(lambda: d.text().count("reloading") > 1, 1.5), d.text()  # 7 looks
    assert d.text().count("Key reload failed") == 1
    assert served(d.client(old))                       # still serving the key read at start
    os.chmod(key, 0o644)
    d.wait_log("reloaded 1 key")
    assert served(d.client(new))
    assert d.text().count("reloading") == 2, d.text()
