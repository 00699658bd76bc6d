"""Key files: K = SHA256(file), C's error lines, and our warnings for weak keys."""
import grp
import hashlib
import io
import os

import pytest

from conftest import exchange, free_port, need_c, rss_kib, tcp_addr, write_key
import spiped


def test_good_key_is_quiet(tmp_path, capsys):
    data = os.urandom(32)
    assert spiped.read_key(write_key(tmp_path / "key", data)) == hashlib.sha256(data).digest()
    assert capsys.readouterr().err == ""


def test_readable_by_others_warns(tmp_path, capsys):
    path = write_key(tmp_path / "key", os.urandom(32), 0o644)
    spiped.read_key(path)
    err = capsys.readouterr().err
    assert err == "spiped: WARNING: key file %s is readable by group or others (chmod 600 it)\n" % path


def test_readable_by_our_own_group_is_quiet(tmp_path, capsys):
    """As a Secret mounted with fsGroup: 0440, group = a group of the process."""
    path = write_key(tmp_path / "key", os.urandom(32), 0o440)
    os.chown(path, -1, os.getegid())
    spiped.read_key(path)
    assert capsys.readouterr().err == ""


def foreign_group():
    """A group this process is not in, or None."""
    ours = {os.getegid(), *os.getgroups()}
    return next((g.gr_gid for g in grp.getgrall() if g.gr_gid not in ours), None)


@pytest.mark.skipif(os.geteuid() != 0 or foreign_group() is None,
                    reason="giving a file to another group needs root and such a group")
def test_readable_by_another_group_warns(tmp_path, capsys):
    path = write_key(tmp_path / "key", os.urandom(32), 0o640)
    os.chown(path, -1, foreign_group())
    spiped.read_key(path)
    err = capsys.readouterr().err
    assert err == "spiped: WARNING: key file %s is readable by group or others (chmod 600 it)\n" % path


def test_short_key_warns_but_works(tmp_path, capsys):
    path = write_key(tmp_path / "key", b"x" * 16)
    assert spiped.read_key(path) == hashlib.sha256(b"x" * 16).digest()
    assert "holds only 16 bytes" in capsys.readouterr().err


def test_dev_null_and_stdin_are_quiet(capsys):
    assert spiped.read_key("/dev/null") == hashlib.sha256(b"").digest()
    assert spiped.read_key("-", stdin=io.BytesIO(b"secret\n")) == hashlib.sha256(b"secret\n").digest()
    assert capsys.readouterr().err == ""


def test_empty_stdin_warns_as_an_empty_file_does(tmp_path, capsys):
    """Nothing on stdin for -k - is a key too (SHA256("")), but most likely a mistake."""
    assert spiped.read_key("-", stdin=io.BytesIO(b"")) == hashlib.sha256(b"").digest()
    assert capsys.readouterr().err == ("spiped: WARNING: the key from stdin holds only 0 bytes;"
                                       " 32 random bytes are recommended\n")
    spiped.read_key(write_key(tmp_path / "key", b""))
    assert "holds only 0 bytes; 32 random bytes are recommended" in capsys.readouterr().err


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
    path = write_key(tmp_path / "key", os.urandom(32), 0o604)
    p = procs.spiped("-d", tcp_addr(free_port()), path)
    assert p.poll() is None
    assert p.log_text() == ("spiped: WARNING: key file %s is readable by group or others"
                            " (chmod 600 it)\n" % path)


# -- long keys: hashed while read, memory stays flat --------------------------

BIG_KEY = 128 << 20     # bytes; reading it whole would peak far above the limit
PEAK_LIMIT_KIB = 60 << 10


def _big_key(tmp_path):
    """A sparse BIG_KEY-byte file with random blocks at its start, middle and end.

    The random blocks make K depend on every part of the file.
    """
    path = tmp_path / "bigkey"
    with open(path, "wb") as f:
        for offset in (0, BIG_KEY // 2, BIG_KEY - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    os.chmod(path, 0o600)
    assert os.path.getsize(path) == BIG_KEY
    return str(path)


@need_c
@pytest.mark.parametrize("how", ["file", "stdin"])
def test_long_key_hashed_in_flat_memory(procs, tmp_path, echo, how):
    """A 128 MiB key (file, or piped to -k -) keeps the daemon's peak RSS low,
    and it derives C's K from the same bytes: a tunnel C -e -> ours -d works."""
    path = _big_key(tmp_path)
    target = echo()
    if how == "file":
        d = procs.spiped("-d", target.addr, path)
    else:  # piped to -k - a MiB at a time
        with open(path, "rb") as key:
            d = procs.spiped("-d", target.addr, "-", input=key, timeout=60)
    peak = rss_kib(d.pid, "VmHWM")
    assert 0 < peak < PEAK_LIMIT_KIB, "peak RSS %d KiB while reading a %d MiB key" % (
        peak, BIG_KEY >> 20)
    e = procs.spiped("-e", d.addr, path, impl="c")
    payload = os.urandom(100000)
    assert exchange(e.addr, payload, timeout=30) == payload
