"""spipe, ours and C's, against both spiped -d; how it ends (half-close,
server close, wrong key, refused); use as an ssh ProxyCommand; the three
ways to start it; and installing: pip into a fresh venv, one copied file,
and a clear message when Cryptodome is missing.
"""
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import (
    C_SPIPE,
    ROOT,
    SPIPED_PY,
    TargetServer,
    address_listening,
    exchange,
    free_port,
    need_c,
    ours_spipe,
    recv_all,
    sha,
    tcp_addr,
)
import spiped

RUN_TIMEOUT = 60
SPIPES = {"ours": ours_spipe, "c": lambda *a: [C_SPIPE, *a]}

# (spipe, spiped -d) pairs: each of ours against C, and ours alone.
PAIRS = [
    pytest.param("ours", "c", id="ours-spipe-c-d", marks=need_c),
    pytest.param("c", "ours", id="c-spipe-ours-d", marks=need_c),
    pytest.param("ours", "ours", id="ours-spipe-ours-d"),
]
BOTH = [pytest.param("c", marks=need_c), "ours"]


@pytest.fixture
def decrypter(procs, keyfile):
    """Factory: start IMPL's `spiped -d -F` in front of TARGET; its address."""
    return lambda impl, target: procs.spiped("-d", target, keyfile, impl=impl).addr


class ScriptedTarget(TargetServer):
    """A TCP target that does the same short script for each connection.

    "reply-later": read to EOF, wait 0.5 s, send REPLY, close.
    "close": close right after accepting.
    "banner": send BANNER, close.
    """

    REPLY = b"reply sent after your EOF\n"
    BANNER = b"SSH-2.0-banner\r\n"

    backlog = 16
    accept_timeout = 30

    def __init__(self, script):
        self.script = script
        self.received = []
        super().__init__()

    def handle(self, c):
        c.settimeout(10)
        if self.script == "banner":
            c.sendall(self.BANNER)
        elif self.script == "reply-later":
            self.received.append(recv_all(c))
            time.sleep(0.5)
            c.sendall(self.REPLY)


@pytest.fixture
def scripted(closing):
    """Makes ScriptedTargets, closed after the test."""
    return lambda script: closing(ScriptedTarget(script))


def run_spipe(cmd, stdin_path, stdout_path, timeout=RUN_TIMEOUT, **kw):
    with open(stdin_path, "rb") as fi, open(stdout_path, "wb") as fo:
        return subprocess.run(cmd, stdin=fi, stdout=fo, stderr=subprocess.PIPE,
                              timeout=timeout, **kw)


def file_sha(path):
    with open(path, "rb") as f:
        return sha(f.read())


# -- data through spipe ------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [0, 1, 1 << 20, 16 << 20], ids=["0B", "1B", "1MiB", "16MiB"])
@pytest.mark.parametrize("client,server", PAIRS)
def test_payload_roundtrip(client, server, size, decrypter, keyfile, echo, tmp_path):
    source = decrypter(server, echo().addr)
    src = tmp_path / "in"
    dst = tmp_path / "out"
    src.write_bytes(os.urandom(size))
    r = run_spipe(SPIPES[client]("-t", source, "-k", keyfile), src, dst)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert os.path.getsize(dst) == size
    assert file_sha(dst) == file_sha(src)


@pytest.mark.parametrize("client,server", PAIRS)
def test_half_close_reply_still_printed(client, server, decrypter, keyfile, scripted, tmp_path):
    target = scripted("reply-later")
    source = decrypter(server, target.addr)
    src = tmp_path / "in"
    src.write_bytes(b"question\n")
    start = time.monotonic()
    r = run_spipe(SPIPES[client]("-t", source, "-k", keyfile), src, tmp_path / "out", timeout=10)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == ScriptedTarget.REPLY
    assert target.received == [b"question\n"]
    assert time.monotonic() - start >= 0.5


@pytest.mark.parametrize("server", BOTH)
@pytest.mark.parametrize("script", ["close", "banner"])
def test_exits_when_server_closes(script, server, procs, decrypter, keyfile, scripted):
    """stdin stays open (a pipe nobody closes): the server's close ends spipe.

    Only ours: C spipe 1.6.2 waits for its stdin to end as well.
    """
    target = scripted(script)
    source = decrypter(server, target.addr)
    r, w = os.pipe()
    try:
        p = procs.start(ours_spipe("-t", source, "-k", keyfile), stdin=r,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(r)
        r = None
        out, err = p.communicate(timeout=5)
    finally:
        if r is not None:
            os.close(r)
        os.close(w)
    assert p.returncode == 0, err
    assert err == b""
    assert out == (ScriptedTarget.BANNER if script == "banner" else b"")


# -- failures ----------------------------------------------------------------


@pytest.mark.parametrize("server", BOTH)
@pytest.mark.parametrize("client", BOTH)
def test_wrong_key(client, server, decrypter, otherkey, echo, tmp_path):
    target = echo()
    source = decrypter(server, target.addr)
    src = tmp_path / "in"
    src.write_bytes(b"must not arrive")
    r = run_spipe(SPIPES[client]("-t", source, "-k", otherkey), src, tmp_path / "out", timeout=15)
    assert r.returncode != 0
    assert (tmp_path / "out").read_bytes() == b""
    assert r.stderr.startswith(b"spipe: "), r.stderr
    assert target.total_received() == 0


@need_c
def test_refused_like_c(keyfile, tmp_path):
    port = free_port()
    results = {}
    for impl in ("c", "ours"):
        p = subprocess.run(SPIPES[impl]("-t", tcp_addr(port), "-k", keyfile),
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
        results[impl] = p
        assert p.returncode == 1, (impl, p)
        assert p.stdout == b"", impl
        # C may add "Error reading: ..." from its copy thread (SPEC §7).
        assert p.stderr.splitlines()[0] == b"spipe: Could not connect", (impl, p.stderr)
    assert results["ours"].stderr.splitlines()[0] == results["c"].stderr.splitlines()[0]


def test_help(tmp_path):
    """--help prints the usage and the extension to stdout and exits 0, as spiped's."""
    r = subprocess.run(ours_spipe("--help"), cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert (r.returncode, r.stderr) == (0, b"")
    out = r.stdout.decode()
    assert out.startswith(spiped.SPIPE_USAGE + "\n")
    assert any(line.split()[:1] == ["--help"] for line in out.splitlines()), out
    assert os.listdir(tmp_path) == []


# -- as ssh's ProxyCommand ---------------------------------------------------


def read_exactly(fd, n, timeout=5.0):
    """N bytes from FD, or fewer if it ends or TIMEOUT passes."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, n - len(got))
        if not chunk:
            break
        got += chunk
    return got


@need_c
def test_proxycommand_binary_interactive(procs, decrypter, keyfile, echo):
    """Every byte value, in turns (write, then wait for the echo), nothing extra."""
    target = echo()
    source = decrypter("c", target.addr)
    p = procs.start(ours_spipe("-t", source, "-k", keyfile), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    all_bytes = bytes(range(256))
    sent = b""
    for turn in range(20):
        # Sizes around packet boundaries; every message holds all 256 values.
        message = (all_bytes[turn:] + all_bytes[:turn]) * (1 + turn % 5)
        message += bytes([255 - turn]) * (turn * 53 % 1024)
        p.stdin.write(message)
        p.stdin.flush()
        sent += message
        assert read_exactly(p.stdout.fileno(), len(message)) == message, "turn %d" % turn
    p.stdin.close()
    rest = read_exactly(p.stdout.fileno(), 1)
    assert rest == b""
    assert p.wait(timeout=5) == 0
    assert p.stderr.read() == b""
    assert target.received == [sent]


# -- three ways to start spipe -----------------------------------------------


@pytest.fixture
def python_on_path(tmp_path):
    """A PATH whose python3 is the interpreter running the tests (it has Cryptodome)."""
    bindir = tmp_path / "pybin"
    bindir.mkdir()
    # A script, not a symlink: a link to a venv's python outside the venv
    # would not find its pyvenv.cfg, and so not the venv's Cryptodome.
    wrapper = bindir / "python3"
    wrapper.write_text('#!/bin/sh\nexec %s "$@"\n' % shlex.quote(sys.executable))
    wrapper.chmod(0o755)
    return str(bindir) + os.pathsep + os.environ.get("PATH", "")


def spipe_via_symlink(tmp_path):
    link = tmp_path / "links" / "spipe"
    link.parent.mkdir(exist_ok=True)
    os.symlink(SPIPED_PY, link)
    return [str(link)]


def test_spiped_py_is_executable_script():
    with open(SPIPED_PY, "rb") as f:
        first = f.readline()
    assert first.startswith(b"#!") and b"python3" in first, first
    assert os.access(SPIPED_PY, os.X_OK), "spiped.py is not executable (chmod +x)"


@pytest.mark.parametrize("way", ["spiped-py-argument", "symlink-named-spipe"])
def test_ways_to_start_spipe(way, decrypter, keyfile, echo, tmp_path, python_on_path):
    if way == "symlink-named-spipe":
        prefix = spipe_via_symlink(tmp_path)
    else:
        prefix = [sys.executable, SPIPED_PY, "spipe"]
    env = dict(os.environ, PATH=python_on_path)
    v = subprocess.run(prefix + ["-v"], capture_output=True, timeout=RUN_TIMEOUT, env=env)
    assert (v.returncode, v.stdout, v.stderr.decode()) == (0, b"", "spipe %s\n" % spiped.__version__)
    source = decrypter("ours", echo().addr)
    r = subprocess.run(prefix + ["-t", source, "-k", keyfile], input=b"started as " + way.encode(),
                       capture_output=True, timeout=RUN_TIMEOUT, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"started as " + way.encode(), b"")


# -- installation -------------------------------------------------------------

# pip output meaning no package index could be used (offline machine).
NO_INDEX = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
)


def copy_project(dest):
    """The project's files, without VCS data or build leftovers (pip builds in place)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".benchmarks", "*.pyc"))


@pytest.mark.timeout(300)
def test_pip_install_into_fresh_venv(tmp_path, decrypter, keyfile, echo):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120,
                   capture_output=True)
    bindir = venv / "bin"
    # The venv must not see the system's Cryptodome: pip has to install it.
    probe = subprocess.run([str(bindir / "python"), "-c", "import Cryptodome"],
                           capture_output=True, timeout=RUN_TIMEOUT)
    assert probe.returncode != 0, "fresh venv already has Cryptodome"
    project = tmp_path / "src"
    copy_project(project)
    pip = subprocess.run([str(bindir / "python"), "-m", "pip", "install", "--no-input",
                          str(project)], capture_output=True, timeout=280)
    log = (pip.stdout + pip.stderr).decode(errors="replace")
    if pip.returncode != 0 and any(marker in log for marker in NO_INDEX):
        pytest.skip("pip cannot reach a package index: %s" % log.strip().splitlines()[-1])
    assert pip.returncode == 0, log
    # The manual pages, where man looks for a prefix whose bin is on PATH.
    pages = sorted(os.listdir(venv / "share" / "man" / "man1"))
    assert pages == ["spipe.1", "spiped-keygen.1", "spiped.1"], pages
    where = subprocess.run([str(bindir / "python"), "-c",
                            "import Cryptodome; print(Cryptodome.__file__)"],
                           capture_output=True, timeout=RUN_TIMEOUT)
    assert where.returncode == 0, where.stderr
    assert where.stdout.decode().startswith(str(venv)), where.stdout

    for prog in ("spiped", "spipe"):
        r = subprocess.run([str(bindir / prog), "-v"], capture_output=True, timeout=RUN_TIMEOUT)
        assert (r.returncode, r.stdout, r.stderr.decode()) == \
            (0, b"", "%s %s\n" % (prog, spiped.__version__)), prog
    r = subprocess.run([str(bindir / "spiped-keygen"), "--help"], capture_output=True,
                       timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert b"usage" in (r.stdout + r.stderr).lower()
    # The installed spipe really works (with the venv's own Cryptodome).
    source = decrypter("ours", echo().addr)
    r = subprocess.run([str(bindir / "spipe"), "-t", source, "-k", keyfile],
                       input=b"installed", capture_output=True, timeout=RUN_TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"installed", b"")


@pytest.fixture
def lone_copy(tmp_path):
    """An otherwise empty directory holding a copy of spiped.py."""
    d = tmp_path / "lone"
    d.mkdir()
    shutil.copy(SPIPED_PY, d / "spiped.py")
    return d


def test_copied_file_alone_works(procs, lone_copy, keyfile, echo):
    script = str(lone_copy / "spiped.py")
    v = subprocess.run([sys.executable, script, "-v"], cwd=str(lone_copy),
                       capture_output=True, timeout=RUN_TIMEOUT)
    assert (v.returncode, v.stdout, v.stderr.decode()) == (0, b"", "spiped %s\n" % spiped.__version__)
    target = echo()
    copy = lambda *args: [sys.executable, script, *args]
    e, _ = procs.chain(target.addr, keyfile, copy, copy, cwd=str(lone_copy))
    payload = os.urandom(100000)
    assert exchange(e.addr, payload, timeout=20) == payload


def _cryptodome_hidden():
    """True when `python -S` (no site-packages) cannot import Cryptodome or Crypto."""
    r = subprocess.run([sys.executable, "-S", "-c",
                        "import importlib.util as u; print(u.find_spec('Cryptodome') or u.find_spec('Crypto'))"],
                       capture_output=True, timeout=RUN_TIMEOUT)
    return r.returncode == 0 and r.stdout.strip() == b"None"


@pytest.mark.parametrize("prog", ["spiped", "spipe"])
def test_missing_cryptodome_message(prog, lone_copy, keyfile):
    if not _cryptodome_hidden():
        pytest.skip("Cryptodome is importable even without site-packages")
    source = tcp_addr(free_port())
    args = ["-e", "-F", "-s", source, "-t", tcp_addr(free_port()), "-k", keyfile]
    if prog == "spipe":
        args = ["spipe", "-t", tcp_addr(free_port()), "-k", keyfile]
    r = subprocess.run([sys.executable, "-S", str(lone_copy / "spiped.py"), *args],
                       cwd=str(lone_copy), stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=RUN_TIMEOUT)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert r.stdout == b""
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    assert err.startswith(prog + ": ")
    assert "Traceback" not in err
    # Debian's package first: pip fails on an externally managed system Python.
    apt = err.find("apt-get install python3-pycryptodome")
    pip = re.search(r"pip install \S*pycryptodomex", err)
    assert "Cryptodome" in err and 0 <= apt and pip and apt < pip.start(), err
    assert not address_listening(source)
