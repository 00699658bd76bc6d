"""Several accepted keys on -d (--accept-key) and key reload on SIGHUP.

The handshake with a key ring is tested on a socketpair; the daemon is
tested against C spiped -e and C spipe, with either key, PFS and -f.
"""
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import spiped
from conftest import (C_SPIPE, Notify, connect, exchange, free_port, need_c, ours, recv_exact,
                      tcp_addr, wait_for, write_key)

# -- the handshake with a key ring ------------------------------------------


def _ring_handshake(ring, client_key, client_fast=False, require_pfs=False,
                    client_message=None, monkeypatch=None):
    """Server with RING against a client with CLIENT_KEY over a socketpair.

    Returns (client result or HandshakeError, server result or
    HandshakeError, the keys the server derived dhmac keys from).
    """
    used = []
    if monkeypatch is not None:
        real = spiped.dhmac_keys

        def spy(key, nonce_c, nonce_s):
            if threading.current_thread().name == "ring-server":
                used.append(key)
            return real(key, nonce_c, nonce_s)
        monkeypatch.setattr(spiped, "dhmac_keys", spy)
    a, b = socket.socketpair()
    out = {}

    def server():
        try:
            out["server"] = spiped.handshake(b, ring, client=False, deadline=spiped.deadline_in(5),
                                             require_pfs=require_pfs)
        except spiped.HandshakeError as e:
            out["server"] = e
        b.close()

    t = threading.Thread(target=server, name="ring-server")
    t.start()
    try:
        client = spiped.handshake(a, client_key, client=True, fast=client_fast, deadline=spiped.deadline_in(5))
    except spiped.HandshakeError as e:
        client = e
    t.join(10)
    a.close()
    return client, out["server"], used


def _works(client, server):
    (c_seal, c_open), (s_seal, s_open) = client, server
    assert s_open.open(c_seal.seal(b"ping")) == b"ping"
    assert c_open.open(s_seal.seal(b"pong")) == b"pong"


@pytest.mark.parametrize("which", [0, 1, 2])
def test_ring_server_names_the_key_the_client_used_and_tries_all(which, monkeypatch):
    keys = [os.urandom(32) for _ in range(3)]
    ring = tuple(zip(("new.key", "old.key", "older.key"), keys))
    client, server, used = _ring_handshake(ring, keys[which], monkeypatch=monkeypatch)
    assert isinstance(server, spiped.HandshakeResult), server
    assert server.key_name == ring[which][0]
    _works(client, server)
    assert used == keys  # every key's MAC computed, whichever matched


def test_ring_refuses_a_key_not_in_it_after_trying_all(monkeypatch):
    keys = [os.urandom(32) for _ in range(3)]
    ring = tuple(zip(("a", "b", "c"), keys))
    client, server, used = _ring_handshake(ring, os.urandom(32), monkeypatch=monkeypatch)
    assert isinstance(server, spiped.HandshakeError) and server.reason == "bad-mac"
    assert isinstance(client, spiped.HandshakeError)
    assert used == keys


def test_ring_with_fast_client_and_require_pfs():
    keys = [os.urandom(32) for _ in range(2)]
    ring = (("a", keys[0]), ("b", keys[1]))
    client, server, _ = _ring_handshake(ring, keys[1], client_fast=True)
    assert server.key_name == "b"
    _works(client, server)
    client, server, _ = _ring_handshake(ring, keys[1], client_fast=True, require_pfs=True)
    assert isinstance(server, spiped.HandshakeError) and server.reason == "no-pfs"


def test_one_key_ring_is_the_bare_key(monkeypatch):
    key = os.urandom(32)
    client, server, used = _ring_handshake(key, key, monkeypatch=monkeypatch)
    assert server.key_name is None and client.key_name is None
    _works(client, server)
    assert used == [key]  # one derivation, as without rings
    client, server, _ = _ring_handshake((("only", key),), key)
    assert server.key_name == "only"
    _works(client, server)


def test_match_key_checks_garbage_after_the_mac():
    """A y >= p with a valid MAC under the second key fails as garbage."""
    keys = [os.urandom(32) for _ in range(2)]
    nc, ns = os.urandom(32), os.urandom(32)
    y = b"\xff" * spiped.DH_SIZE
    mac_c, _ = spiped.dhmac_keys(keys[1], nc, ns)
    message = y + spiped.hmac_sha256(mac_c, y)
    name, key, found_c, _ = spiped.match_key((("a", keys[0]), ("b", keys[1])), nc, ns, message)
    assert (name, key, found_c) == ("b", keys[1], mac_c)
    with pytest.raises(spiped.HandshakeError) as info:
        spiped.check_dh_message(message, found_c, False)
    assert info.value.reason == "garbage"
    assert spiped.match_key((("a", keys[0]),), nc, ns, message) is None


# -- the daemon: ours -d with several keys, C clients ------------------------


class KeyDaemon:
    """Our spiped -d -k NEW --accept-key OLD... in front of an echo target; log in a file.

    INPUT: the key for -k - (NEW is "-" then).
    """

    def __init__(self, procs, echo, key, accept=(), input=None, **kw):
        self.procs = procs
        self.target = echo()
        accepted = [arg for path in accept for arg in ("--accept-key", path)]
        self.proc = procs.spiped("-d", self.target.addr, key, "--log-connections", *accepted,
                                 input=input, **kw)
        self.addr = self.proc.addr

    def text(self):
        return self.proc.log_text()

    def wait_log(self, pred, timeout=15):
        assert wait_for(lambda: pred(self.text()), timeout), self.text()
        return self.text()

    def encryptor(self, key, fast=False):
        """A C spiped -e in front of us using KEY; its plaintext address."""
        return self.procs.spiped("-e", self.addr, key, *(["-f"] if fast else []), impl="c").addr

    def reload(self, pred):
        """SIGHUP, then wait until the log has one more reload line satisfying PRED."""
        assert wait_for(lambda: catches(self.proc.pid, signal.SIGHUP))
        before = self.text().count("reload")
        self.proc.send_signal(signal.SIGHUP)
        text = self.wait_log(lambda t: t.count("reload") > before)
        line = [l for l in text.splitlines() if "reload" in l][-1]
        assert pred(line), line
        assert self.proc.poll() is None
        return line

    def stats(self):
        assert wait_for(lambda: catches(self.proc.pid, signal.SIGUSR1))
        before = self.text().count("stats:")
        self.proc.send_signal(signal.SIGUSR1)
        text = self.wait_log(lambda t: t.count("stats:") > before)
        return [l for l in text.splitlines() if "stats:" in l][-1]


def catches(pid, signum):
    """True once process PID has a handler for SIGNUM (its handlers come after bind)."""
    with open("/proc/%d/status" % pid) as f:
        mask = next(int(l.split()[1], 16) for l in f if l.startswith("SigCgt:"))
    return bool(mask & (1 << (signum - 1)))


def served(addr, payload=None):
    payload = payload or os.urandom(5000)
    return exchange(addr, payload, timeout=20) == payload


def spipe_served(daemon, key, fast=False):
    data = os.urandom(3000)
    r = subprocess.run([C_SPIPE, "-t", daemon.addr, "-k", key] + (["-f"] if fast else []),
                       input=data, capture_output=True, timeout=30)
    return r.returncode == 0 and r.stdout == data


@need_c
@pytest.mark.parametrize("fast", [False, True], ids=["pfs", "fast"])
def test_c_clients_with_either_accepted_key(procs, tmp_path, echo, fast):
    new, old, third = (write_key(tmp_path / n) for n in ("new.key", "old.key", "third.key"))
    d = KeyDaemon(procs, echo, new, [old])
    assert served(d.encryptor(new, fast))
    assert served(d.encryptor(old, fast))
    assert spipe_served(d, new, fast) and spipe_served(d, old, fast)
    assert exchange(d.encryptor(third, fast), b"x" * 100, timeout=20) == b""
    assert not spipe_served(d, third, fast)
    text = d.wait_log(lambda t: t.count("handshake failed") >= 2)
    assert "key new.key" in text and "key old.key" in text
    line = d.stats()
    assert " keys=new.key=2,old.key=2" in line, line
    assert "bad-mac=2" in line, line


@need_c
def test_sighup_rotates_the_key_and_live_connections_keep_theirs(procs, tmp_path, echo):
    new, old = write_key(tmp_path / "new.key"), write_key(tmp_path / "old.key")
    replaced = str(tmp_path / "replaced.key")
    with open(new, "rb") as f, open(replaced, "wb") as g:
        g.write(f.read())
    d = KeyDaemon(procs, echo, new, [old])
    through_replaced = d.encryptor(replaced)   # the -k key before the reload
    live = connect(through_replaced, timeout=20)
    first = os.urandom(200000)
    live.sendall(first)
    assert recv_exact(live, len(first)) == first
    d.wait_log(lambda t: "key new.key" in t)

    with open(new + ".tmp", "wb") as f:
        f.write(os.urandom(32))
    os.chmod(new + ".tmp", 0o600)
    os.rename(new + ".tmp", new)
    d.reload(lambda l: "reloaded 2 keys" in l)

    second = os.urandom(300000)
    live.sendall(second)
    assert recv_exact(live, len(second)) == second  # byte-exact across the reload
    assert served(d.encryptor(new))
    assert served(d.encryptor(old))
    assert not served(d.encryptor(replaced))
    assert not spipe_served(d, replaced)
    live.shutdown(socket.SHUT_WR)
    assert live.recv(1) == b""
    live.close()
    assert wait_for(lambda: first + second in d.target.received)  # the target's view too
    line = d.stats()
    assert " keys=new.key=2,old.key=1" in line, line  # the live one and the new client


@need_c
@pytest.mark.parametrize("damage", ["missing", "directory"])
def test_failed_reload_keeps_the_keys_in_use(procs, tmp_path, echo, damage):
    new, old = write_key(tmp_path / "new.key"), write_key(tmp_path / "old.key")
    saved_old = str(tmp_path / "saved-old.key")
    with open(old, "rb") as f, open(saved_old, "wb") as g:
        g.write(f.read())
    d = KeyDaemon(procs, echo, new, [old])
    os.unlink(old)
    if damage == "directory":
        os.mkdir(old)
    with open(new, "wb") as f:   # a good change that must not be taken alone
        f.write(os.urandom(32))
    line = d.reload(lambda l: "Key reload failed" in l)
    assert old in line, line
    assert {"missing": "No such file or directory",
            "directory": "Is a directory"}[damage] in line, line
    assert served(d.encryptor(saved_old))   # the keys in use stay in use
    assert not served(d.encryptor(new))     # the new -k content was not taken
    assert d.proc.poll() is None


@need_c
def test_reload_reads_an_empty_key_as_the_start_does(procs, tmp_path, echo):
    """An empty file is a key (SHA256 of nothing) with C's warning, at a reload as at the start."""
    key = write_key(tmp_path / "k.key")
    d = KeyDaemon(procs, echo, key)
    open(key, "wb").close()
    line = d.reload(lambda l: "reloaded 1 key" in l)
    assert "Key reload failed" not in d.text(), d.text()
    assert "holds only 0 bytes" in d.text(), d.text()
    assert served(d.encryptor(key))  # a C client with the same empty file


def test_accept_key_with_e_is_a_usage_error(keyfile, otherkey):
    r = subprocess.run(ours("-e", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k", keyfile,
                            "--accept-key", otherkey), capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.decode() == "spiped: --accept-key: needs -d\n" + spiped.SPIPED_USAGE
    r = subprocess.run(ours("-d", "-s", "[127.0.0.1]:1", "-t", "[127.0.0.1]:2", "-k", keyfile,
                            "-k", otherkey), capture_output=True, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith(b"usage: spiped"), r.stderr


def test_spipe_does_not_know_accept_key(keyfile, otherkey):
    r = subprocess.run(ours("spipe", "-t", "[127.0.0.1]:2", "-k", keyfile,
                            "--accept-key", otherkey), capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith(b"spipe: illegal option -- --accept-key\nusage: spipe"), r.stderr


def test_missing_accept_key_at_start_is_fatal_with_c_lines(tmp_path, keyfile):
    missing = str(tmp_path / "nope.key")
    r = subprocess.run(ours("-d", "-F", "-s", tcp_addr(free_port()), "-t", "[127.0.0.1]:2",
                            "-k", keyfile, "--accept-key", missing),
                       capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.decode() == ("spiped: Cannot open file: %s: No such file or directory\n"
                                 "spiped: Error reading shared secret\n" % missing)


# -- reload details: systemd, stdin, PID 1, -e --------------------------------


def test_reload_tells_systemd_reloading_then_ready(procs, tmp_path, echo):
    key = write_key(tmp_path / "new.key")
    listener = Notify(str(tmp_path / "notify"))
    try:
        env = dict(os.environ, NOTIFY_SOCKET=listener.env)
        d = KeyDaemon(procs, echo, key, env=env)
        listener.wait_for_text("READY=1", 15)
        start = len(listener.lines)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d.reload(lambda l: "reloaded 1 key" in l)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        listener.wait_for_text("READY=1", 15, since=start)
        messages = listener.lines[start:]
        reloading = messages.index("RELOADING=1")
        assert reloading < messages.index("READY=1")
        usec = [m for m in messages if m.startswith("MONOTONIC_USEC=")]
        assert len(usec) == 1 and before <= int(usec[0].split("=")[1]) <= after, messages
    finally:
        listener.close()


def test_reload_keeps_the_stdin_key_and_says_so(procs, tmp_path, echo):
    secret = os.urandom(32)
    same = tmp_path / "same.key"
    same.write_bytes(secret)
    old = write_key(tmp_path / "old.key")
    d = KeyDaemon(procs, echo, "-", [old], input=secret)
    line = d.reload(lambda l: "reloaded 2 keys" in l)
    assert "stdin" in line, line
    assert served(procs.spiped("-e", d.addr, str(same)).addr)
    d.wait_log(lambda t: "key stdin" in t)


def _children(pid):
    found = []
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
            found += [int(x) for x in f.read().split()]
    return found


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare(1)")
def test_sighup_reloads_as_pid_1(procs, tmp_path, echo):
    """In a PID namespace (as in a container) SIGHUP reloads too; it does not kill."""
    key = write_key(tmp_path / "new.key")
    target = echo()
    probe = subprocess.run(["unshare", "-fp", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a PID namespace here: %r" % probe.stderr)
    in_namespace = lambda *args: ["unshare", "-fp", "--mount-proc", *ours(*args)]
    wrapper = procs.spiped("-d", target.addr, key, impl=in_namespace)
    assert wait_for(lambda: _children(wrapper.pid))
    pid = _children(wrapper.pid)[0]
    try:
        assert wait_for(lambda: catches(pid, signal.SIGHUP)), wrapper.log_text()
        assert wait_for(lambda: "Docker signal-handling bug" in wrapper.log_text())  # it is PID 1
        os.kill(pid, signal.SIGHUP)
        assert wait_for(lambda: "reloaded 1 key" in wrapper.log_text()), wrapper.log_text()
        assert wrapper.poll() is None
        assert served(procs.spiped("-e", wrapper.addr, key).addr)
    finally:
        # unshare does not pass signals on: end the namespace's PID 1 itself
        # (which ends the namespace), then unshare exits and is reaped.
        os.kill(pid, signal.SIGKILL)
        wrapper.wait(timeout=10)


def test_log_connections_on_e_names_the_k_file(procs, tmp_path, echo):
    key = write_key(tmp_path / "tunnel.key")
    d = KeyDaemon(procs, echo, key)
    e = procs.spiped("-e", d.addr, key, "--log-connections")
    assert served(e.addr)
    assert wait_for(lambda: "connection 1: key tunnel.key" in e.log_text()), e.log_text()


# -- service definitions: reload is SIGHUP ------------------------------------

CONTRIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib")


def test_systemd_unit_reloads_with_sighup():
    with open(os.path.join(CONTRIB, "systemd", "spiped@.service")) as f:
        lines = [l.strip() for l in f if l.startswith("ExecReload=")]
    assert lines == ["ExecReload=/bin/kill -HUP $MAINPID"]


def test_openrc_reload_signals_hup_through_supervise_daemon(tmp_path):
    """Source the script as openrc-run would, with stand-ins, and run reload."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "supervise-daemon"
    stub.write_text('#!/bin/sh\nprintf "%%s\\n" "$*" >> "%s"\n' % calls)
    os.chmod(stub, 0o755)
    harness = tmp_path / "harness.sh"
    harness.write_text(
        'ebegin() { :; }\neend() { return "$1"; }\n'
        'RC_SVCNAME=spiped.smtp\n. "$1"\n'
        'case " $extra_started_commands " in *" reload "*) ;; *) exit 3;; esac\n'
        'reload\n')
    env = dict(os.environ, PATH="%s:%s" % (bin_dir, os.environ.get("PATH", "/usr/bin:/bin")))
    r = subprocess.run(["/bin/sh", str(harness), os.path.join(CONTRIB, "openrc", "spiped")],
                       capture_output=True, text=True, timeout=20, env=env)
    assert r.returncode == 0, r.stderr
    assert calls.read_text() == "spiped.smtp --signal HUP\n"


def test_help_lists_accept_key_and_sighup():
    r = subprocess.run(ours("--help"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert "--accept-key FILE" in r.stdout and "SIGHUP" in r.stdout
