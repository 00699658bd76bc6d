"""README.md's install-and-run block as a script under `set -e`.

tests/fresh-machine.sh runs the block for real on a fresh Debian tree
(`bash -e`, twice).  Here, without installing anything, the same block runs
with stand-ins: `sudo` and `apt-get` on PATH that only record their call,
and a `keygen.py` and a `spiped.py` in the current folder that behave like
the daemons as far as the block can tell (fork, write `<source>.pid`, stop
on SIGTERM).  The stop lines alone also meet the pidfiles a new user can
have: none, stale, naming another program, and daemons that remove their
pidfile or exit at once on SIGTERM.
"""
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, pid_gone

README = os.path.join(ROOT, "README.md")
SOURCES = ("[127.0.0.1]:8025", "[127.0.0.1]:8026")
SHELLS = ["bash"] + (["dash"] if shutil.which("dash") else [])


def readme_block(heading):
    """The first ```sh block under "## HEADING", as tests/fresh-machine.sh's
    readme_block takes it."""
    lines, under, inside = [], False, False
    with open(README) as f:
        for line in f.read().splitlines():
            if line == "## " + heading:
                under = True
            elif under and line.startswith("## "):
                break
            elif under and not inside and line == "```sh":
                inside = True
            elif inside and line == "```":
                break
            elif inside:
                lines.append(line)
    assert lines, "no ```sh block under ## %s in README.md" % heading
    return "\n".join(lines) + "\n"


def stop_lines():
    """The block without its install, key and start lines: what stops the
    daemons of an earlier run."""
    keep = [l for l in readme_block("Install and run").splitlines()
            if "apt-get" not in l and "keygen.py" not in l
            and not l.startswith("python3 spiped.py")]
    text = "\n".join(keep) + "\n"
    assert all(s + ".pid" in text for s in SOURCES), text
    return text


STANDIN = r'''"""Stands in for spiped.py -d/-e: forks into the background once SOURCE.pid
is written and runs until SIGTERM.  STANDIN_TERM=linger: on SIGTERM it
removes its pidfile, then lingers STANDIN_LINGER seconds (as a daemon does
while open connections finish) before it exits; STANDIN_TERM=die: SIGTERM's
default action, gone at once.  Like a busy port, it refuses to start while
an earlier one for the same -s in this folder still runs."""
import os, signal, sys, time

source = sys.argv[sys.argv.index("-s") + 1]
here = os.getcwd()


def runs(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        return "spiped.py" in argv[1:2] and source in argv and os.readlink("/proc/%d/cwd" % pid) == here
    except (OSError, IndexError):
        return False


if any(runs(int(d)) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid()):
    sys.exit("spiped.py stand-in: bind(%s): Address already in use" % source)
ready_r, ready_w = os.pipe()
if os.fork():
    os.close(ready_w)
    sys.exit(0 if os.read(ready_r, 1) == b"1" else 1)
os.setsid()
pidfile = source + ".pid"


def term(signum, frame):
    try:
        os.unlink(pidfile)
    except OSError:
        pass
    time.sleep(float(os.environ.get("STANDIN_LINGER", "0.5")))
    os._exit(0)


if os.environ.get("STANDIN_TERM", "linger") == "linger":
    signal.signal(signal.SIGTERM, term)
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.write(ready_w, b"1")
while True:
    time.sleep(60)
'''

KEYGEN = r'''import sys
open(sys.argv[1], "wb").write(b"k" * 32)
open("keygen.calls", "a").write(sys.argv[1] + "\n")
'''


def write_exe(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def pid_of(folder, source):
    with open(os.path.join(folder, source + ".pid")) as f:
        return int(f.read())


@pytest.fixture
def folder(tmp_path):
    """A folder with the stand-ins; whatever they left running is killed at the end."""
    with open(tmp_path / "spiped.py", "w") as f:
        f.write(STANDIN)
    with open(tmp_path / "keygen.py", "w") as f:
        f.write(KEYGEN)
    started = []
    yield tmp_path, started
    for pid in started:
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)


def start_standins(folder, started, term):
    for mode, source in (("-d", SOURCES[1]), ("-e", SOURCES[0])):
        subprocess.run(["python3", "spiped.py", mode, "-s", source, "-t", "x", "-k", "keyfile"],
                       cwd=folder, env=dict(os.environ, STANDIN_TERM=term), check=True, timeout=20)
        started.append(pid_of(folder, source))
    return started[-2:]


def run_script(shell, folder, text, env=None):
    """TEXT as a script under SHELL -e, then a last line that shows it got there."""
    script = os.path.join(folder, "block.sh")
    with open(script, "w") as f:
        f.write(text + "echo reached the end\n")
    return subprocess.run([shell, "-e", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=30)


def assert_reached_end(p, shell):
    assert p.returncode == 0 and p.stdout.endswith("reached the end\n"), \
        "the README block stopped under %s -e (exit %d):\n%s%s" % (shell, p.returncode, p.stdout, p.stderr)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("pidfiles", ["none", "stale", "another program"])
def test_stop_lines_pass_over_pidfiles_of_no_daemon(folder, shell, pidfiles):
    tmp, started = folder
    other = None
    if pidfiles == "stale":
        dead = subprocess.Popen(["true"])
        dead.wait()
        for s in SOURCES:
            (tmp / (s + ".pid")).write_text("%d\n" % dead.pid)
    elif pidfiles == "another program":
        other = subprocess.Popen(["sleep", "30"])
        for s in SOURCES:
            (tmp / (s + ".pid")).write_text("%d\n" % other.pid)
    try:
        assert_reached_end(run_script(shell, tmp, stop_lines()), shell)
        if other is not None:
            assert other.poll() is None, "the stop lines killed a process that is not spiped.py"
    finally:
        if other is not None:
            other.kill()
            other.wait()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("term", ["linger", "die"])
def test_stop_lines_stop_daemons_and_wait_until_gone(folder, shell, term):
    """linger: each daemon removes its pidfile at once and exits 0.5 s later;
    die: each is gone before anything can wait for it."""
    tmp, started = folder
    pids = start_standins(tmp, started, term)
    began = time.monotonic()
    p = run_script(shell, tmp, stop_lines())
    took = time.monotonic() - began
    assert_reached_end(p, shell)
    assert all(pid_gone(pid) for pid in pids), "still running after the stop lines: %s" % pids
    if term == "linger":
        assert took >= 0.5, "the stop lines returned after %.2f s, before the daemons exited" % took


@pytest.mark.parametrize("shell", SHELLS)
def test_install_and_run_block_twice_under_set_e(folder, shell):
    """The whole block, twice, as a new user's script: the first run finds
    nothing running, the second replaces the first run's daemons."""
    tmp, started = folder
    stubs = tmp / "bin"
    stubs.mkdir()
    write_exe(stubs / "sudo", '#!/bin/sh\nexec "$@"\n')
    write_exe(stubs / "apt-get", '#!/bin/sh\necho "$*" >>"$PWD/apt-get.calls"\n')
    env = dict(os.environ, PATH="%s:%s" % (stubs, os.environ["PATH"]))
    block = readme_block("Install and run")
    runs = []
    for _ in range(2):
        assert_reached_end(run_script(shell, tmp, block, env=env), shell)
        runs.append([pid_of(tmp, s) for s in SOURCES])
        started.extend(runs[-1])
    assert not set(runs[0]) & set(runs[1])
    assert all(pid_gone(pid) for pid in runs[0]), "the first run's daemons still run: %s" % runs[0]
    assert not any(pid_gone(pid) for pid in runs[1]), "the second run's daemons are not running"
    assert (tmp / "keygen.calls").read_text() == "keyfile\n", "the key was made again"
    assert len((tmp / "apt-get.calls").read_text().splitlines()) == 4
