#!/usr/bin/env python3
"""Load generators of the bench: the target server and the load client.

Run by bench.py as separate processes (``python -S load.py _server ...`` and
``python -S load.py _client ...``), so this file uses only the standard
library.  Both are written around large buffers (1 MiB ``sendall`` /
``recv_into``) and non-blocking ``selectors`` loops where many connections
are involved, so that they stay cheap next to the daemons.  The client waits
for a "go" line on stdin and prints one JSON result line.
"""

import argparse
import errno
import json
import math
import os
import selectors
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import zlib

HOST = "127.0.0.1"
MiB = 1 << 20
BUF = 1 << 20               # send/receive buffer of the bulk helpers


# --------------------------------------------------------------------------
# Helpers shared by the child processes
# --------------------------------------------------------------------------

def _die_with_parent():
    """Ask the kernel to SIGKILL this process when its parent dies."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except Exception:
        pass


def _watchdog(max_seconds):
    """Exit the process if the parent goes away or after MAX_SECONDS."""
    parent = os.getppid()
    end = time.monotonic() + max_seconds

    def run():
        while time.monotonic() < end:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)
        os._exit(4)
    threading.Thread(target=run, daemon=True).start()


def _payload(size):
    """SIZE bytes of incompressible data (contents do not affect spiped)."""
    return memoryview(os.urandom(size))


def _recv_exact(sock, n):
    """Read exactly N bytes or until EOF; returns the bytes read."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _drain(sock, buf):
    """Read until EOF into BUF; returns the byte count."""
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return total
        total += n


# --------------------------------------------------------------------------
# Target server process: sink, echo, bidir
# --------------------------------------------------------------------------

def server_main(argv):
    """Run a target server on --port until killed (or the parent is gone).

    sink:  read to EOF, reply with the byte count (8 bytes, big-endian), close.
    bidir: send --size bytes while reading to EOF; close when both are done;
           print one JSON line per connection.
    echo:  echo everything (selectors, one thread); close after EOF + flush.
    """
    ap = argparse.ArgumentParser(prog="load.py _server")
    ap.add_argument("mode", choices=["sink", "echo", "bidir"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--cap", type=float, default=60.0)
    ap.add_argument("--lifetime", type=float, default=900.0)
    a = ap.parse_args(argv)
    _die_with_parent()
    _watchdog(a.lifetime)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((HOST, a.port))
    ls.listen(1024)
    if a.mode == "echo":
        _echo_loop(ls)
        return
    payload = _payload(BUF) if a.mode == "bidir" else None
    lock = threading.Lock()
    while True:
        c, _ = ls.accept()
        if a.mode == "sink":
            th = threading.Thread(target=_sink_conn, args=(c,), daemon=True)
        else:
            th = threading.Thread(target=_bidir_conn,
                                  args=(c, payload, a.size, a.cap, lock),
                                  daemon=True)
        th.start()


def _sink_conn(c):
    """Count bytes to EOF, answer with the count, close."""
    try:
        c.settimeout(300)
        total = _drain(c, bytearray(BUF))
        c.sendall(struct.pack("!Q", total))
    except OSError:
        pass
    finally:
        c.close()


def _bidir_conn(c, payload, size, cap, lock):
    """Send SIZE bytes (or until CAP seconds) while reading to EOF."""
    res = {"sent": 0, "recv": 0, "error": None}
    t0 = time.perf_counter()

    def sender():
        try:
            sent = 0
            while sent < size and time.perf_counter() - t0 < cap:
                k = min(len(payload), size - sent)
                c.sendall(payload[:k])
                sent += k
            res["sent"] = sent
        except OSError as e:
            res["error"] = "send: %s" % e

    c.settimeout(300)
    th = threading.Thread(target=sender, daemon=True)
    th.start()
    try:
        res["recv"] = _drain(c, bytearray(BUF))
    except OSError as e:
        res["error"] = "recv: %s" % e
    th.join(300)
    c.close()
    res["seconds"] = time.perf_counter() - t0
    with lock:
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


class _EchoConn:
    __slots__ = ("sock", "out", "eof", "events")

    def __init__(self, sock):
        self.sock = sock
        self.out = bytearray()
        self.eof = False
        self.events = selectors.EVENT_READ


def _echo_loop(ls):
    """Single-threaded non-blocking echo server with per-connection back-pressure."""
    high = 256 * 1024
    sel = selectors.DefaultSelector()
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, None)
    buf = bytearray(256 * 1024)
    mv = memoryview(buf)

    def close(st):
        sel.unregister(st.sock)
        st.sock.close()

    def update(st):
        ev = 0
        if not st.eof and len(st.out) < high:
            ev |= selectors.EVENT_READ
        if st.out:
            ev |= selectors.EVENT_WRITE
        if ev == 0:
            close(st)
        elif ev != st.events:
            st.events = ev
            sel.modify(st.sock, ev, st)

    while True:
        for key, ev in sel.select(timeout=1.0):
            st = key.data
            if st is None:
                for _ in range(128):
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    ns = _EchoConn(c)
                    sel.register(c, selectors.EVENT_READ, ns)
                continue
            s = st.sock
            try:
                if ev & selectors.EVENT_READ and not st.eof:
                    n = s.recv_into(buf)
                    if n == 0:
                        st.eof = True
                    elif st.out:
                        st.out += mv[:n]
                    else:
                        try:
                            sent = s.send(mv[:n])
                        except BlockingIOError:
                            sent = 0
                        if sent < n:
                            st.out += mv[sent:n]
                elif ev & selectors.EVENT_WRITE and st.out:
                    sent = s.send(st.out)
                    del st.out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                close(st)
                continue
            update(st)


# --------------------------------------------------------------------------
# Load client process: bulk, bidir, conns, echo, multi
# --------------------------------------------------------------------------

def client_main(argv):
    """Run one load pattern against --port and print a JSON result line."""
    ap = argparse.ArgumentParser(prog="load.py _client")
    ap.add_argument("mode", choices=["bulk", "bidir", "conns", "echo", "multi", "held",
                                     "unauth", "burst"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--cap", type=float, default=30.0)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--hold", type=float, default=0.0)
    a = ap.parse_args(argv)
    _die_with_parent()
    _watchdog(a.timeout + a.cap + a.hold + 120)
    # wait for the go-ahead: the process starts while the daemons come up
    if not sys.stdin.readline():
        return
    fn = {"bulk": _client_bulk, "bidir": _client_bidir, "conns": _client_conns,
          "echo": _client_echo, "multi": _client_multi, "held": _client_held,
          "unauth": _client_unauth, "burst": _client_burst}[a.mode]
    res = fn(a)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


def _client_bulk(a):
    """Send --size bytes (stop early after --cap s), half-close, await the count."""
    payload = _payload(BUF)
    t0 = time.perf_counter()
    s = socket.create_connection((HOST, a.port), timeout=a.timeout)
    sent = 0
    capped = False
    while sent < a.size:
        if time.perf_counter() - t0 > a.cap:
            capped = True
            break
        k = min(BUF, a.size - sent)
        s.sendall(payload[:k])
        sent += k
    s.shutdown(socket.SHUT_WR)
    ack = _recv_exact(s, 8)
    t1 = time.perf_counter()
    s.close()
    if len(ack) != 8:
        return {"error": "no byte count from sink (connection dropped)",
                "sent": sent, "seconds": t1 - t0}
    got = struct.unpack("!Q", ack)[0]
    res = {"sent": sent, "received": got, "seconds": t1 - t0, "capped": capped,
           "mib_s": got / MiB / (t1 - t0)}
    if got != sent:
        res["error"] = "sink got %d of %d bytes" % (got, sent)
    return res


def _client_bidir(a):
    """Send --size bytes while receiving the target's --size bytes."""
    payload = _payload(BUF)
    t0 = time.perf_counter()
    s = socket.create_connection((HOST, a.port), timeout=a.timeout)
    out = {"sent": 0, "error": None}

    def sender():
        try:
            sent = 0
            while sent < a.size and time.perf_counter() - t0 < a.cap:
                k = min(BUF, a.size - sent)
                s.sendall(payload[:k])
                sent += k
            out["sent"] = sent
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            out["error"] = "send: %s" % e

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    try:
        recv = _drain(s, bytearray(BUF))
    except OSError as e:
        recv = 0
        out["error"] = "recv: %s" % e
    th.join(a.timeout)
    t1 = time.perf_counter()
    s.close()
    res = {"sent": out["sent"], "received": recv, "seconds": t1 - t0,
           "mib_s": (out["sent"] + recv) / MiB / (t1 - t0)}
    if out["error"]:
        res["error"] = out["error"]
    return res


def _client_conns(a):
    """--threads workers: connect, send 1 byte, read it back, close; for --cap s."""
    per = max(1, math.ceil(a.count / a.threads))
    results = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + a.cap

    def worker():
        ok = 0
        errs = {}
        setup = []
        for _ in range(per):
            if time.perf_counter() >= deadline:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(a.timeout)
            t0 = time.perf_counter()
            try:
                s.connect((HOST, a.port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(b"x")
                d = s.recv(1)
                t1 = time.perf_counter()
                if d != b"x":
                    raise ConnectionError("echo missing")
                ok += 1
                setup.append(t1 - t0)
            except OSError as e:
                k = type(e).__name__
                errs[k] = errs.get(k, 0) + 1
            finally:
                s.close()
        with lock:
            results.append((ok, errs, setup))

    ths = [threading.Thread(target=worker, daemon=True) for _ in range(a.threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(a.cap + a.timeout + 5)
    elapsed = time.perf_counter() - start
    ok = sum(r[0] for r in results)
    errs = {}
    for r in results:
        for k, v in r[1].items():
            errs[k] = errs.get(k, 0) + v
    setup = [x for r in results for x in r[2]]
    res = {"ok": ok, "errors": sum(errs.values()), "error_kinds": errs,
           "seconds": elapsed, "conn_s": ok / elapsed,
           "threads": a.threads}
    if setup:
        res["setup_ms_p50"] = 1000 * _pct(setup, 50)
        res["setup_ms_p90"] = 1000 * _pct(setup, 90)
        res["setup_ms_max"] = 1000 * max(setup)
    return res


def _client_unauth(a):
    """--count connections one after another that send nothing: connect, half-close,
    wait for the daemon to close its side, close; for --cap s at most."""
    ok = 0
    errs = {}
    start = time.perf_counter()
    deadline = start + a.cap
    for _ in range(a.count):
        if time.perf_counter() >= deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        try:
            s.connect((HOST, a.port))
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
            ok += 1
        except OSError as e:
            k = type(e).__name__
            errs[k] = errs.get(k, 0) + 1
        finally:
            s.close()
    elapsed = time.perf_counter() - start
    return {"ok": ok, "errors": sum(errs.values()), "error_kinds": errs,
            "seconds": elapsed, "conn_s": ok / elapsed if elapsed else 0.0}


def _client_burst(a):
    """--count connects started at once (non-blocking), then the first byte awaited on each.

    What a -d daemon sends first is its handshake's nonce: a connection is
    "served" once a byte came back, within --cap s.  "all_s" is the time
    until the last one was served (or the cap).
    """
    sel = selectors.DefaultSelector()
    errs = {}
    socks = []
    t0 = time.perf_counter()
    for _ in range(a.count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex((HOST, a.port))
        if rc not in (0, errno.EINPROGRESS):
            k = "connect: " + errno.errorcode.get(rc, str(rc))
            errs[k] = errs.get(k, 0) + 1
            s.close()
            continue
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    served = 0
    deadline = t0 + a.cap
    while sel.get_map() and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=min(0.5, max(0, deadline - time.perf_counter()))):
            try:
                got = key.fileobj.recv(1)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                got = b""
                k = "recv: " + errno.errorcode.get(e.errno, str(e.errno))
                errs[k] = errs.get(k, 0) + 1
            sel.unregister(key.fileobj)
            served += bool(got)
    t1 = time.perf_counter()
    waiting = len(sel.get_map())
    if waiting:
        errs["no byte within the cap"] = waiting
    sel.close()
    for s in socks:
        s.close()
    return {"ok": served, "served": served, "errors": a.count - served, "error_kinds": errs,
            "all_s": t1 - t0, "conns": a.count}


def _client_echo(a):
    """--count round trips of --size bytes on one held connection."""
    size = a.size or 64
    warm = 20
    s = socket.create_connection((HOST, a.port), timeout=a.timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = os.urandom(size)
    buf = bytearray(size)
    mv = memoryview(buf)
    rtts = []
    deadline = time.perf_counter() + a.cap
    for i in range(warm + a.count):
        if time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < size:
            n = s.recv_into(mv[got:])
            if not n:
                raise ConnectionError("EOF during echo")
            got += n
        t1 = time.perf_counter()
        if buf != msg:
            raise ValueError("echo mismatch")
        if i >= warm:
            rtts.append((t1 - t0) * 1e6)
    s.shutdown(socket.SHUT_WR)
    _drain(s, bytearray(4096))
    s.close()
    return {"count": len(rtts), "p50_us": _pct(rtts, 50), "p99_us": _pct(rtts, 99),
            "mean_us": statistics.fmean(rtts),
            "rtt_us": [round(x, 1) for x in rtts]}


class _MultiConn:
    __slots__ = ("sock", "sent", "rcvd", "crc", "wdone", "opening")

    def __init__(self, sock):
        self.sock = sock
        self.sent = 0
        self.rcvd = 0
        self.crc = 0
        self.wdone = False
        self.opening = True       # until its first byte has come back


def _client_multi(a):
    """--count connections all open at once, each echoing --size bytes.

    Phase 1 opens the connections, at most --threads of them in flight
    (connect, send 1 byte, wait for its echo), so the burst does not overflow
    C spiped's listen backlog of 10.  Phase 2 starts when every connection is
    open: all of them send the rest of their --size bytes and read the echo
    at the same time.  "seconds" is phase 2; "open_s" is phase 1.
    """
    size = a.size
    payload = _payload(size)
    expect = zlib.crc32(payload)
    sel = selectors.DefaultSelector()
    errs = {}
    step = 256 * 1024
    buf = bytearray(256 * 1024)
    mv = memoryview(buf)
    done = []
    state = {"live": 0, "opening": 0, "started": 0, "peak": 0, "t_data": None}
    max_opening = max(1, a.threads)
    rw = selectors.EVENT_READ | selectors.EVENT_WRITE

    def add_err(kind):
        errs[kind] = errs.get(kind, 0) + 1

    def finish(st, kind=None):
        sel.unregister(st.sock)
        st.sock.close()
        state["live"] -= 1
        if st.opening:
            st.opening = False
            state["opening"] -= 1
        if kind:
            add_err(kind)
        else:
            done.append(time.perf_counter() - state["t_data"])

    def open_more():
        while state["opening"] < max_opening and state["started"] < a.count:
            state["started"] += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            rc = s.connect_ex((HOST, a.port))
            if rc not in (0, errno.EINPROGRESS):
                add_err("connect: " + errno.errorcode.get(rc, str(rc)))
                s.close()
                continue
            sel.register(s, selectors.EVENT_WRITE, _MultiConn(s))
            state["live"] += 1
            state["opening"] += 1
            state["peak"] = max(state["peak"], state["live"])
        if state["t_data"] is None and state["started"] == a.count \
                and state["opening"] == 0:
            state["t_data"] = time.perf_counter()
            for key in list(sel.get_map().values()):
                sel.modify(key.fileobj, rw, key.data)

    t0 = time.perf_counter()
    deadline = t0 + a.cap
    open_more()
    while state["live"] > 0:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        for key, ev in sel.select(timeout=min(1.0, left)):
            st = key.data
            s = st.sock
            op = "connect" if st.opening else "send"
            try:
                if ev & selectors.EVENT_WRITE and st.opening:
                    if s.send(payload[:1]) == 1:
                        st.sent = 1
                        sel.modify(s, selectors.EVENT_READ, st)
                    continue
                if ev & selectors.EVENT_WRITE and not st.wdone:
                    n = s.send(payload[st.sent:st.sent + step])
                    st.sent += n
                    if st.sent >= size:
                        op = "shutdown"
                        s.shutdown(socket.SHUT_WR)
                        st.wdone = True
                        sel.modify(s, selectors.EVENT_READ, st)
                if ev & selectors.EVENT_READ:
                    op = "recv"
                    n = s.recv_into(buf)
                    if n == 0:
                        if st.wdone and st.rcvd == size and st.crc == expect:
                            finish(st)
                        else:
                            finish(st, "EOF after %d of %d bytes" % (st.rcvd, size))
                        continue
                    st.rcvd += n
                    st.crc = zlib.crc32(mv[:n], st.crc)
                    if st.opening:
                        st.opening = False
                        state["opening"] -= 1
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                finish(st, "%s: %s" % (op, errno.errorcode.get(e.errno, e.errno)))
        open_more()
    t1 = time.perf_counter()
    if state["live"] > 0:
        errs["timeout"] = errs.get("timeout", 0) + state["live"]
        for key in list(sel.get_map().values()):
            key.data.sock.close()
    if state["started"] < a.count:
        errs["never opened"] = a.count - state["started"]
    t_data = state["t_data"] or t1
    res = {"ok": len(done), "errors": sum(errs.values()), "error_kinds": errs,
           "seconds": t1 - t_data, "open_s": t_data - t0, "total_s": t1 - t0,
           "conns": a.count, "size": size, "peak_open": state["peak"],
           "max_opening": max_opening}
    if done:
        res["conn_done_s_p50"] = _pct(done, 50)
        res["conn_done_s_max"] = max(done)
    return res


def _client_held(a):
    """--count connections opened and held: each echoes --size bytes once.

    At most --threads connections are being opened at a time (connect,
    send --size bytes, wait for all of them to come back) and at most --rate
    connections start per second, so C's listen backlog of 10
    never overflows.  Once every connection has echoed (or failed, or --cap
    seconds passed) all are held --hold seconds more, then closed.
    "open_s" is the time until all were open and echoed.
    """
    size = max(1, a.size)
    payload = _payload(size)
    sel = selectors.DefaultSelector()
    errs = {}
    conns = []
    state = {"opening": 0, "started": 0, "ok": 0}
    max_opening = max(1, a.threads)
    buf = bytearray(65536)

    def fail(st, kind):
        errs[kind] = errs.get(kind, 0) + 1
        if st is not None:
            try:
                sel.unregister(st.sock)
            except (KeyError, ValueError):
                pass
            st.sock.close()
            state["opening"] -= 1

    t0 = time.perf_counter()
    deadline = t0 + a.cap
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        allowed = a.count if a.rate <= 0 else min(a.count, 1 + int((now - t0) * a.rate))
        while state["opening"] < max_opening and state["started"] < allowed:
            state["started"] += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            rc = s.connect_ex((HOST, a.port))
            if rc not in (0, errno.EINPROGRESS):
                fail(None, "connect: " + errno.errorcode.get(rc, str(rc)))
                s.close()
                continue
            st = _MultiConn(s)
            sel.register(s, selectors.EVENT_WRITE, st)
            state["opening"] += 1
        if state["started"] >= a.count and state["opening"] == 0:
            break
        timeout = min(0.5, deadline - now)
        if state["started"] < a.count and state["opening"] < max_opening:
            timeout = min(timeout, 1.0 / a.rate if a.rate > 0 else 0)
        for key, ev in sel.select(timeout=max(0, timeout)):
            st = key.data
            s = st.sock
            try:
                if st.sent < size:
                    st.sent += s.send(payload[st.sent:])
                    if st.sent >= size:
                        sel.modify(s, selectors.EVENT_READ, st)
                    continue
                n = s.recv_into(buf)
                if n == 0:
                    fail(st, "EOF after %d of %d bytes" % (st.rcvd, size))
                    continue
                st.crc = zlib.crc32(memoryview(buf)[:n], st.crc)
                st.rcvd += n
                if st.rcvd >= size:
                    sel.unregister(s)
                    state["opening"] -= 1
                    if st.rcvd == size and st.crc == zlib.crc32(payload):
                        state["ok"] += 1
                        conns.append(s)
                    else:
                        errs["wrong echo"] = errs.get("wrong echo", 0) + 1
                        s.close()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                fail(st, "%s: %s" % ("send" if st.sent < size else "recv",
                                     errno.errorcode.get(e.errno, e.errno)))
    t1 = time.perf_counter()
    if state["opening"]:
        errs["timeout"] = errs.get("timeout", 0) + state["opening"]
        for key in list(sel.get_map().values()):
            key.data.sock.close()
    if state["started"] < a.count:
        errs["never opened"] = a.count - state["started"]
    sel.close()
    # every connection is open (and idle) now: the orchestrator samples
    # the daemons meanwhile
    time.sleep(a.hold)
    # the held connections must still be alive: one more byte each way on
    # all of them at once, bounded by --cap seconds
    sel = selectors.DefaultSelector()
    dead = 0
    for s in conns:
        try:
            s.send(b"!")
            sel.register(s, selectors.EVENT_READ)
        except OSError:
            dead += 1
    end = time.perf_counter() + a.cap
    while sel.get_map() and time.perf_counter() < end:
        for key, _ in sel.select(timeout=min(1.0, max(0, end - time.perf_counter()))):
            try:
                ok = key.fileobj.recv(1) == b"!"
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                ok = False
            sel.unregister(key.fileobj)
            dead += not ok
    dead += len(sel.get_map())
    sel.close()
    if dead:
        errs["dropped while held"] = dead
    for s in conns:
        s.close()
    return {"ok": state["ok"] - dead, "errors": sum(errs.values()), "error_kinds": errs,
            "open_s": t1 - t0, "conns": a.count, "held_s": a.hold,
            "total_s": time.perf_counter() - t0, "max_opening": max_opening,
            "rate": a.rate}


def _pct(vals, p):
    """The P-th percentile of VALS (statistics.quantiles, inclusive), or None."""
    if not vals:
        return None
    if len(vals) == 1:
        return vals[0]
    if p == 50:
        return statistics.median(vals)
    return statistics.quantiles(vals, n=100, method="inclusive")[p - 1]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        server_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2:])
    else:
        sys.exit("usage: load.py _server|_client ... (run by bench.py)")
