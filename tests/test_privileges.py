"""-u with an interpreter and Cryptodome the dropped user cannot read.

The usual pyenv or venv under /root (0700): after the drop, nothing more can
be imported from there, so everything a connection needs must already be
loaded.  Ours runs as a copy of spiped.py in a world-readable folder, from
the real interpreter (under /root here), with Cryptodome copied into a
0700 folder on PYTHONPATH; C spiped is the peer on the other side.
"""
import os
import shutil
import signal

import pytest

from conftest import (REAL_PYTHON, SPIPED_PY, exchange, free_port, need_c, proc_ids, tcp_addr,
                      wait_for)

try:
    import pwd
    NOBODY = pwd.getpwnam("nobody").pw_uid
except KeyError:
    NOBODY = None

pytestmark = [
    need_c,
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges with -u needs root"),
    pytest.mark.skipif(NOBODY is None, reason="no user nobody"),
]


@pytest.fixture
def private(tmp_path):
    """(folder with spiped.py and a root-only key, environment with a private Cryptodome)."""
    import Cryptodome
    public = tmp_path / "public"
    public.mkdir()
    shutil.copy(SPIPED_PY, public / "spiped.py")
    key = public / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    hidden = tmp_path / "hidden"
    shutil.copytree(os.path.dirname(Cryptodome.__file__), hidden / "Cryptodome")
    hidden.chmod(0o700)
    for folder in (tmp_path, public):
        folder.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(hidden))
    return public, env


def start_ours(procs, public, env, args, source):
    """The copy of spiped.py in PUBLIC, run by the real interpreter with ENV: -F -u nobody ARGS."""
    return procs.daemon([REAL_PYTHON, str(public / "spiped.py"), "-F", "-u", "nobody", *args],
                        source, env=env, cwd=str(public))


def dropped(pid):
    return proc_ids(pid)[0][0] == NOBODY


def bytes_read(pid):
    """The bytes PID's reads have got so far (rchar)."""
    with open("/proc/%d/io" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def check_tunnel(front, p):
    payload = os.urandom(100_000)
    assert wait_for(lambda: dropped(p.pid), 5), "ours did not become nobody"
    for _ in range(3):
        assert exchange(front, payload, timeout=30) == payload, p.log_text()
    assert p.poll() is None
    assert "Error" not in p.log_text()
    assert "internal error" not in p.log_text()


@pytest.mark.parametrize("fast", [False, True], ids=["pfs", "f"])
def test_decrypting_as_nobody(procs, private, echo, fast):
    public, env = private
    target = echo()
    ours_src = tcp_addr(free_port())
    flags = ["-f"] if fast else []
    p = start_ours(procs, public, env, ["-d", "-s", ours_src, "-t", target.addr,
                                        "-k", str(public / "key"), *flags], ours_src)
    front = procs.spiped("-e", ours_src, str(public / "key"), *flags, impl="c")
    check_tunnel(front.addr, p)


@pytest.mark.parametrize("fast", [False, True], ids=["pfs", "f"])
def test_encrypting_as_nobody(procs, private, echo, fast):
    public, env = private
    target = echo()
    flags = ["-f"] if fast else []
    back = procs.spiped("-d", target.addr, str(public / "key"), *flags, impl="c")
    front = tcp_addr(free_port())
    # By name, looked up again each second (-r 1) by a thread, as nobody.
    by_name = "localhost:" + back.addr.rsplit(":", 1)[1]
    p = start_ours(procs, public, env, ["-e", "-s", front, "-t", by_name, "-r", "1",
                                        "-k", str(public / "key"), *flags], front)
    check_tunnel(front, p)
    # The thing tested: a look-up after the drop.  Each reads /etc/hosts, and
    # nothing else reads in the idle daemon: once reads came twice more, one
    # look-up has begun and ended since.
    for _ in range(2):
        before = bytes_read(p.pid)
        assert wait_for(lambda: bytes_read(p.pid) > before, 5), "no look-up: " + p.log_text()
    check_tunnel(front, p)


def test_config_as_nobody(procs, private, echo):
    public, env = private
    target = echo()
    ours_src = tcp_addr(free_port())
    conf = public / "tunnels.conf"
    conf.write_text("-d -s %s -t %s -k %s\n" % (ours_src, target.addr, public / "key"))
    p = start_ours(procs, public, env, ["--config", str(conf), "-p", str(public / "pid")],
                   ours_src)
    front = procs.spiped("-e", ours_src, str(public / "key"), impl="c")
    check_tunnel(front.addr, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0


@pytest.mark.parametrize("form", ["command-line", "config"])
def test_reload_of_a_root_only_key_after_u_says_why(procs, private, echo, form):
    """SIGHUP re-reads keys as nobody: a root-owned 0600 key fails, and the line says why."""
    public, env = private
    target = echo()
    ours_src = tcp_addr(free_port())
    tunnel = ["-d", "-s", ours_src, "-t", target.addr, "-k", str(public / "key")]
    if form == "config":
        conf = public / "tunnels.conf"
        conf.write_text(" ".join(tunnel) + "\n")
        tunnel = ["--config", str(conf), "-p", str(public / "pid")]
    p = start_ours(procs, public, env, tunnel, ours_src)
    assert wait_for(lambda: dropped(p.pid), 5)
    p.send_signal(signal.SIGHUP)
    want = "Permission denied after -u nobody (make the file readable by that user"
    assert wait_for(lambda: want in p.log_text(), 10), p.log_text()
    assert p.poll() is None
    front = procs.spiped("-e", ours_src, str(public / "key"), impl="c")
    check_tunnel(front.addr, p)  # still serving with the key read at the start
