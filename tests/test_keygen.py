"""keygen.py: key files are 32 random bytes, mode 0600 from the start, never
clobbered without --force, and failures are one clear line with status 1."""
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import REAL_PYTHON, ROOT

KEYGEN = os.path.join(ROOT, "keygen.py")


def keygen(*args, **kw):
    """Run keygen.py with ARGS; the CompletedProcess with bytes output."""
    kw.setdefault("timeout", 30)
    return subprocess.run([sys.executable, KEYGEN, *args], capture_output=True, **kw)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def one_error_line(result):
    """The single stderr line of a failed run, after checking its form."""
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("spiped-keygen: ")
    return lines[0]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277, 0o777])
def test_new_key_is_32_bytes_mode_0600(tmp_path, umask):
    path = tmp_path / "key"
    result = keygen(str(path), umask=umask)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""
    assert mode(path) == 0o600
    assert len(path.read_bytes()) == 32


def test_two_keys_differ(tmp_path):
    assert keygen(str(tmp_path / "a")).returncode == 0
    assert keygen(str(tmp_path / "b")).returncode == 0
    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"old key")
    line = one_error_line(keygen(str(path)))
    assert "--force" in line and str(path) in line
    assert path.read_bytes() == b"old key"


def test_refuses_to_follow_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "key"
    link.symlink_to(target)
    one_error_line(keygen(str(link)))
    assert not target.exists()


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_force_replaces_and_keeps_0600(tmp_path, umask):
    path = tmp_path / "key"
    path.write_bytes(b"old key")
    os.chmod(path, 0o644)
    result = keygen("--force", str(path), umask=umask)
    assert result.returncode == 0, result.stderr
    data = path.read_bytes()
    assert len(data) == 32 and data != b"old key"
    assert mode(path) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["key"]  # no temporary file left


def test_force_creates_missing_file(tmp_path):
    path = tmp_path / "key"
    assert keygen(str(path), "--force").returncode == 0
    assert mode(path) == 0o600 and len(path.read_bytes()) == 32


def test_force_onto_directory_fails_cleanly(tmp_path):
    (tmp_path / "key").mkdir()
    one_error_line(keygen("--force", str(tmp_path / "key")))
    assert sorted(os.listdir(tmp_path)) == ["key"]


def test_dash_writes_to_stdout(tmp_path):
    result = keygen("-", cwd=str(tmp_path))
    assert result.returncode == 0
    assert len(result.stdout) == 32
    assert result.stderr == b""
    assert os.listdir(tmp_path) == []
    assert keygen("-").stdout != result.stdout


@pytest.mark.parametrize("force", [False, True])
def test_missing_directory(tmp_path, force):
    path = tmp_path / "nodir" / "key"
    line = one_error_line(keygen(*(["--force"] if force else []), str(path)))
    assert "No such file or directory" in line
    assert not (tmp_path / "nodir").exists()


@pytest.fixture
def locked_dir():
    """A directory owned by nobody with mode 0500 (in a folder anyone can
    read, next to a copy of keygen.py), and the ids to run as nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run keygen as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no nobody user")
    top = tempfile.mkdtemp(prefix="keygen", dir="/tmp")
    os.chmod(top, 0o755)
    shutil.copy(KEYGEN, os.path.join(top, "keygen.py"))  # the checkout may be unreadable
    locked = os.path.join(top, "locked")
    os.mkdir(locked)
    os.chown(locked, nobody.pw_uid, nobody.pw_gid)
    os.chmod(locked, 0o500)
    yield locked, nobody
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("force", [False, True])
def test_permission_denied(locked_dir, force):
    locked, nobody = locked_dir
    path = os.path.join(locked, "key")
    cmd = ["setpriv", "--reuid=%d" % nobody.pw_uid, "--regid=%d" % nobody.pw_gid, "--clear-groups",
           REAL_PYTHON, os.path.join(os.path.dirname(locked), "keygen.py"),
           *(["--force"] if force else []), path]
    line = one_error_line(subprocess.run(cmd, cwd="/", capture_output=True, timeout=30))
    assert "Permission denied" in line
    assert os.listdir(locked) == []


@pytest.mark.parametrize("args", [[], ["a", "b"], ["-x", "key"], ["--forse", "key"], [""]],
                         ids=["none", "two-paths", "unknown-short", "unknown-long", "empty"])
def test_bad_arguments_print_usage(tmp_path, args):
    result = keygen(*args, cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"usage: spiped-keygen" in result.stderr
    assert os.listdir(tmp_path) == []


def test_help(tmp_path):
    result = keygen("--help", cwd=str(tmp_path))
    assert result.returncode == 0
    assert b"usage: spiped-keygen" in result.stdout
    assert result.stderr == b""
    assert os.listdir(tmp_path) == []


def test_double_dash_allows_dash_names(tmp_path):
    result = keygen("--", "-key", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "-key").read_bytes()) == 32


def test_runs_as_a_lone_copy(tmp_path):
    """A copy of keygen.py alone in a directory works: standard library only."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(KEYGEN, alone / "keygen.py")
    out = tmp_path / "key"
    result = subprocess.run([sys.executable, "-I", str(alone / "keygen.py"), str(out)],
                            cwd=str(alone), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert mode(out) == 0o600 and len(out.read_bytes()) == 32


def test_main_returns_exit_status(tmp_path):
    """The console-script entry point keygen:main returns a status."""
    import keygen as module  # conftest puts the repository on sys.path

    assert module.main([str(tmp_path / "key")]) == 0
    assert module.main([str(tmp_path / "key")]) == 1
    assert mode(tmp_path / "key") == 0o600
