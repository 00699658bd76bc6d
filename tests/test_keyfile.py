"""Key files: K = SHA256(file), C's error lines, and our warnings for weak keys."""
import hashlib
import io
import os

import pytest

from conftest import free_port, ours, tcp_addr
import spiped


def _key(tmp_path, data, mode=0o600, name="key"):
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_good_key_is_quiet(tmp_path, capsys):
    data = os.urandom(32)
    assert spiped.read_key(_key(tmp_path, data)) == hashlib.sha256(data).digest()
    assert capsys.readouterr().err == ""


def test_readable_by_others_warns(tmp_path, capsys):
    path = _key(tmp_path, os.urandom(32), 0o644)
    spiped.read_key(path)
    err = capsys.readouterr().err
    assert err == "spiped: WARNING: key file %s is readable by group or others (chmod 600 it)\n" % path


def test_short_key_warns_but_works(tmp_path, capsys):
    path = _key(tmp_path, b"x" * 16)
    assert spiped.read_key(path) == hashlib.sha256(b"x" * 16).digest()
    assert "holds only 16 bytes" in capsys.readouterr().err


def test_dev_null_and_stdin_are_quiet(capsys):
    assert spiped.read_key("/dev/null") == hashlib.sha256(b"").digest()
    assert spiped.read_key("-", stdin=io.BytesIO(b"secret\n")) == hashlib.sha256(b"secret\n").digest()
    assert capsys.readouterr().err == ""


def test_missing_and_directory_give_c_messages(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(spiped.SpipedError) as info:
        spiped.read_key(missing)
    assert info.value.lines == ("Cannot open file: %s: No such file or directory" % missing,
                                "Error reading shared secret")
    with pytest.raises(spiped.SpipedError) as info:
        spiped.read_key(str(tmp_path))
    assert info.value.lines == ("Error reading file: %s: Is a directory" % tmp_path,
                                "Error reading shared secret")


def test_daemon_warns_and_serves(procs, tmp_path):
    """The warning is printed at start-up and the daemon still runs."""
    path = _key(tmp_path, os.urandom(32), 0o640)
    src = tcp_addr(free_port())
    err = tmp_path / "err"
    with open(err, "wb") as f:
        p = procs.daemon(ours("-d", "-F", "-s", src, "-t", tcp_addr(free_port()), "-k", path),
                         src, stderr=f)
    assert p.poll() is None
    assert err.read_text() == ("spiped: WARNING: key file %s is readable by group or others"
                               " (chmod 600 it)\n" % path)
