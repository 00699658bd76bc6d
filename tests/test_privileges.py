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
import time

import pytest

from conftest import (REAL_PYTHON, SPIPED_PY, c_spiped, exchange, free_port, need_c, tcp_addr,
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
    log = open(public / "err", "ab")
    try:
        return procs.daemon([REAL_PYTHON, str(public / "spiped.py"), "-F", "-u", "nobody", *args],
                            source, env=env, stderr=log, cwd=str(public))
    finally:
        log.close()


def dropped(pid):
    with open("/proc/%d/status" % pid) as f:
        return any(line.split()[1:2] == [str(NOBODY)] for line in f if line.startswith("Uid:"))


def check_tunnel(front, p, public):
    payload = os.urandom(100_000)
    assert wait_for(lambda: dropped(p.pid), 5), "ours did not become nobody"
    for _ in range(3):
        assert exchange(front, payload, timeout=30) == payload, (public / "err").read_text()
    assert p.poll() is None
    assert "Error" not in (public / "err").read_text()
    assert "internal error" not in (public / "err").read_text()


@pytest.mark.parametrize("fast", [False, True], ids=["pfs", "f"])
def test_decrypting_as_nobody(procs, private, echo, fast):
    public, env = private
    target = echo()
    ours_src = tcp_addr(free_port())
    flags = ["-f"] if fast else []
    p = start_ours(procs, public, env, ["-d", "-s", ours_src, "-t", target.addr,
                                        "-k", str(public / "key"), *flags], ours_src)
    front = tcp_addr(free_port())
    procs.daemon(c_spiped("-e", "-F", "-s", front, "-t", ours_src, "-k", str(public / "key"),
                          *flags), front)
    check_tunnel(front, p, public)


@pytest.mark.parametrize("fast", [False, True], ids=["pfs", "f"])
def test_encrypting_as_nobody(procs, private, echo, fast):
    public, env = private
    target = echo()
    flags = ["-f"] if fast else []
    back = tcp_addr(free_port())
    procs.daemon(c_spiped("-d", "-F", "-s", back, "-t", target.addr, "-k", str(public / "key"),
                          *flags), back)
    front = tcp_addr(free_port())
    # By name, looked up again each second (-r 1) by a thread, as nobody.
    by_name = "localhost:" + back.rsplit(":", 1)[1]
    p = start_ours(procs, public, env, ["-e", "-s", front, "-t", by_name, "-r", "1",
                                        "-k", str(public / "key"), *flags], front)
    check_tunnel(front, p, public)
    time.sleep(1.5)  # the thing tested: a look-up after the drop
    check_tunnel(front, p, public)


def test_config_as_nobody(procs, private, echo):
    public, env = private
    target = echo()
    ours_src = tcp_addr(free_port())
    conf = public / "tunnels.conf"
    conf.write_text("-d -s %s -t %s -k %s\n" % (ours_src, target.addr, public / "key"))
    p = start_ours(procs, public, env, ["--config", str(conf), "-p", str(public / "pid")],
                   ours_src)
    front = tcp_addr(free_port())
    procs.daemon(c_spiped("-e", "-F", "-s", front, "-t", ours_src, "-k", str(public / "key")),
                 front)
    check_tunnel(front, p, public)
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
    assert wait_for(lambda: want in (public / "err").read_text(), 10), (public / "err").read_text()
    assert p.poll() is None
    front = tcp_addr(free_port())
    procs.daemon(c_spiped("-e", "-F", "-s", front, "-t", ours_src, "-k", str(public / "key")),
                 front)
    check_tunnel(front, p, public)  # still serving with the key read at the start
