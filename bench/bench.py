#!/usr/bin/env python3
"""Compare the throughput, latency and footprint of C spiped and spiped.py.

Every measurement runs on 127.0.0.1 with freshly started daemons:

    load client --> [spiped -e] --> [spiped -d] --> target server
    (process)        (daemon)        (daemon)       (process)

The load client and the target server are separate Python processes started
from this file (``bench.py _client ...`` / ``bench.py _server ...``), written
around large buffers so that they stay cheap next to the daemons.  Each metric
is also measured with the client talking to the target directly (no spiped),
and printed as a reference row: the ceiling of the harness on this machine.

C and ours are interleaved (C, ours, ours, C, ...) and every repeat starts new
daemons.  The table shows the median over repeats, the ratio ours/C, which
direction is better, the target for that ratio and PASS/FAIL.  All raw samples,
medians and machine facts go to a JSON file.

Only the standard library is used.  See bench/README.md.
"""

import argparse
import contextlib
import datetime
import errno
import json
import math
import os
import platform
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20
GiB = 1 << 30
BUF = 1 << 20               # send/receive buffer of the bulk helpers
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    ap = argparse.ArgumentParser(prog="bench.py _server")
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
    ap = argparse.ArgumentParser(prog="bench.py _client")
    ap.add_argument("mode", choices=["bulk", "bidir", "conns", "echo", "multi", "held"])
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
          "echo": _client_echo, "multi": _client_multi, "held": _client_held}[a.mode]
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
    setup = sorted(x for r in results for x in r[2])
    res = {"ok": ok, "errors": sum(errs.values()), "error_kinds": errs,
           "seconds": elapsed, "conn_s": ok / elapsed,
           "threads": a.threads}
    if setup:
        res["setup_ms_p50"] = 1000 * _pct(setup, 50)
        res["setup_ms_p90"] = 1000 * _pct(setup, 90)
        res["setup_ms_max"] = 1000 * setup[-1]
    return res


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
    srt = sorted(rtts)
    return {"count": len(rtts), "p50_us": _pct(srt, 50), "p99_us": _pct(srt, 99),
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
    spiped's listen backlog of 10.  Phase 2 starts when every connection is
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
    done.sort()
    t_data = state["t_data"] or t1
    res = {"ok": len(done), "errors": sum(errs.values()), "error_kinds": errs,
           "seconds": t1 - t_data, "open_s": t_data - t0, "total_s": t1 - t0,
           "conns": a.count, "size": size, "peak_open": state["peak"],
           "max_opening": max_opening}
    if done:
        res["conn_done_s_p50"] = _pct(done, 50)
        res["conn_done_s_max"] = done[-1]
    return res


def _client_held(a):
    """--count connections opened and held: each echoes --size bytes once.

    At most --threads connections are being opened at a time (connect,
    send --size bytes, wait for all of them to come back) and at most --rate
    connections start per second, so the daemons' listen backlog of 10
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


def _pct(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1,
                   int(math.ceil(p / 100.0 * len(sorted_vals))) - 1))
    return sorted_vals[k]


# --------------------------------------------------------------------------
# /proc helpers (orchestrator)
# --------------------------------------------------------------------------

def proc_tree(pid):
    """PID and all its live descendants."""
    out = [pid]
    i = 0
    while i < len(out) and len(out) < 1000:
        p = out[i]
        i += 1
        try:
            for tid in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, tid)) as f:
                    out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid):
    """utime+stime of PID's process tree (all threads), in seconds."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])   # utime, stime
    return total / CLK_TCK


def status_kib(pid, field):
    """Sum of a /proc/PID/status field (kB) over PID's process tree."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def listening_inodes(port):
    """Socket inodes in LISTEN state on local PORT (IPv4 and IPv6).

    /proc/net/tcp also lists every TIME_WAIT socket (tens of thousands after
    the connection tests), so the text is searched, not parsed line by line.
    """
    found = set()
    needle = (":%04X " % port).encode()
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn, "rb") as f:
                data = f.read()
        except OSError:
            continue
        pos = data.find(needle)
        while pos >= 0:
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            fl = data[start:end if end >= 0 else len(data)].split()
            if len(fl) > 9 and fl[3] == b"0A" and \
                    int(fl[1].rsplit(b":", 1)[1], 16) == port:
                found.add(fl[9].decode())
            if end < 0:
                break
            pos = data.find(needle, end)
    return found


def socket_inodes(pid):
    """Inodes of the sockets held open by PID's process tree."""
    found = set()
    for p in proc_tree(pid):
        try:
            fds = os.listdir("/proc/%d/fd" % p)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink("/proc/%d/fd/%s" % (p, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                found.add(link[8:-1])
    return found


# --------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------

class SampleError(Exception):
    """One sample failed; it is recorded and the run goes on."""


class RssSampler(threading.Thread):
    """Record the peak VmRSS of some processes every INTERVAL seconds."""

    def __init__(self, pids, interval=0.02, limit=600.0):
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.limit = limit
        self.peak = {k: 0 for k in pids}
        self.samples = 0
        self.stop_ev = threading.Event()

    def run(self):
        end = time.monotonic() + self.limit
        while not self.stop_ev.is_set() and time.monotonic() < end:
            for k, pid in self.pids.items():
                self.peak[k] = max(self.peak[k], status_kib(pid, "VmRSS"))
            self.samples += 1
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.join(5)


class StatusSampler(threading.Thread):
    """Peak VmRSS and Threads of single processes, from /proc/PID/status only.

    Lighter than RssSampler (no walk over a process tree, whose cost grows
    with the thread count), for the phase with thousands of threads.
    """

    def __init__(self, pids, interval=0.1, limit=600.0):
        super().__init__(daemon=True)
        self.pids = pids
        self.interval = interval
        self.limit = limit
        self.peak = {k: {"VmRSS": 0, "Threads": 0} for k in pids}
        self.samples = 0
        self.stop_ev = threading.Event()

    def run(self):
        end = time.monotonic() + self.limit
        while not self.stop_ev.is_set() and time.monotonic() < end:
            for k, pid in self.pids.items():
                try:
                    with open("/proc/%d/status" % pid) as f:
                        for line in f:
                            name, _, value = line.partition(":")
                            if name in ("VmRSS", "Threads"):
                                v = int(value.split()[0])
                                self.peak[k][name] = max(self.peak[k][name], v)
                except (OSError, ValueError):
                    pass
            self.samples += 1
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.join(5)


def raise_nofile(need):
    """Raise this process's RLIMIT_NOFILE (inherited by the daemons) to NEED.

    Returns a note saying what could not be done, or None.
    """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft >= need:
        return None
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return None
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return ("RLIMIT_NOFILE could be raised to %d only (hard limit), %d wanted:"
                    " expect errors" % (hard, need))
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return None


class Bench:
    """Starts, watches and stops the processes of one sample."""

    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="spiped-bench-")
        self.key = os.path.join(self.tmp, "key")
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        self.procs = []          # live Popen objects, for cleanup
        self.used_ports = set()
        self.impls = {"c": self._cmd(args.c), "ours": self._cmd(args.ours)}
        self.nlog = 0

    @staticmethod
    def _cmd(path):
        """Command prefix for an implementation: *.py runs with this Python."""
        if path.endswith(".py"):
            return [sys.executable, path]
        return [path]

    # -- process management -------------------------------------------------

    def spawn(self, stack, cmd, **kw):
        """Popen CMD; it is killed when STACK unwinds (and at cleanup)."""
        p = subprocess.Popen(cmd, preexec_fn=_die_with_parent, **kw)
        self.procs.append(p)
        stack.callback(self.kill, p)
        return p

    def kill(self, p):
        """SIGKILL P (and any children it made) and reap it."""
        if p.poll() is None:
            for pid in reversed(proc_tree(p.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (p.stdout, p.stderr, p.stdin):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        if p in self.procs and p.returncode is not None:
            self.procs.remove(p)

    def cleanup(self):
        for p in list(self.procs):
            self.kill(p)
        try:
            for fn in os.listdir(self.tmp):
                os.unlink(os.path.join(self.tmp, fn))
            os.rmdir(self.tmp)
        except OSError:
            pass

    def free_port(self):
        """A loopback port that was free a moment ago, not used before in this run."""
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
            if port not in self.used_ports:
                self.used_ports.add(port)
                return port
        raise SampleError("no free port")

    def wait_listening(self, p, port, what, log, timeout=20.0):
        """Poll /proc/net/tcp until P's tree has a socket listening on PORT."""
        end = time.monotonic() + timeout
        delay = 0.002
        while time.monotonic() < end:
            if p.poll() is not None:
                raise SampleError("%s exited with %s before listening%s"
                                  % (what, p.returncode, _log_tail(log)))
            # cheap test first: reading /proc/net/tcp costs the kernel a walk
            # over every TIME_WAIT socket
            mine = socket_inodes(p.pid)
            if mine and listening_inodes(port) & mine:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        raise SampleError("%s not listening on %d after %.0f s%s"
                          % (what, port, timeout, _log_tail(log)))

    # -- one sample's processes ---------------------------------------------

    def rig(self, stack, server_mode, pair, client_mode, fast=False,
            server_opts=(), d_opts=(), **client_opts):
        """Start target, daemons (unless PAIR is "direct") and a waiting client.

        Everything is spawned at once, then each listener is awaited through
        /proc/net/tcp.  Returns a Rig; rig.go(wall) runs the client.
        """
        t0 = time.monotonic()
        helper = [sys.executable, "-S", os.path.abspath(__file__)]
        waits = []
        tport = self.free_port()
        srv = self.spawn(stack, helper + ["_server", server_mode, "--port", str(tport)]
                         + list(server_opts),
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        waits.append((srv, tport, "target server", None))
        e = d = None
        entry = tport
        if pair != "direct":
            enc, dec = PAIRS[pair]
            dport, eport = self.free_port(), self.free_port()
            d, dlog = self._daemon(stack, dec, "d", dport, tport, fast, d_opts)
            e, elog = self._daemon(stack, enc, "e", eport, dport, fast)
            waits += [(d, dport, "%s -d" % dec, dlog), (e, eport, "%s -e" % enc, elog)]
            entry = eport
        cmd = helper + ["_client", client_mode, "--port", str(entry)]
        for k, v in client_opts.items():
            cmd += ["--" + k, str(v)]
        cli = self.spawn(stack, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        for w in waits:
            self.wait_listening(*w)
        rig = Rig(self, srv, e, d, cli, client_mode)
        rig.startup_s = time.monotonic() - t0
        return rig

    def _daemon(self, stack, impl, mode, src, tgt, fast, extra=()):
        """Spawn one spiped daemon (-F, -n 0, then EXTRA); its output goes to a log file."""
        self.nlog += 1
        log = os.path.join(self.tmp, "daemon%d.log" % self.nlog)
        cmd = self.impls[impl] + [
            "-" + mode, "-s", "[%s]:%d" % (HOST, src), "-t", "[%s]:%d" % (HOST, tgt),
            "-k", self.key, "-F", "-n", "0"] + (["-f"] if fast else []) + list(extra)
        with open(log, "wb") as lf:
            p = self.spawn(stack, cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
        return p, log


class Rig:
    """The processes of one sample: target server, daemons e/d, load client."""

    def __init__(self, bench, srv, e, d, cli, mode):
        self.bench, self.srv, self.e, self.d, self.cli = bench, srv, e, d, cli
        self.mode = mode

    def go(self, wall):
        """Start the waiting client; return its JSON result (kill it after WALL s)."""
        p = self.cli
        t0 = time.monotonic()
        try:
            out, err = p.communicate(b"go\n", timeout=wall)
        except subprocess.TimeoutExpired:
            self.bench.kill(p)
            raise SampleError("client %s timed out after %.0f s" % (self.mode, wall))
        lines = out.decode(errors="replace").strip().splitlines()
        if p.returncode != 0 or not lines:
            raise SampleError("client %s failed (%s): %s" % (
                self.mode, p.returncode,
                " | ".join(err.decode(errors="replace").strip().splitlines()[-2:])))
        res = json.loads(lines[-1])
        res["startup_s"] = round(self.startup_s, 3)
        res["client_s"] = round(time.monotonic() - t0, 3)
        return res


def _read_line(f, timeout):
    """One line from pipe F within TIMEOUT seconds, or None."""
    import select
    end = time.monotonic() + timeout
    data = b""
    fd = f.fileno()
    while time.monotonic() < end and not data.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], max(0, end - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip() or None


def _log_tail(log):
    if not log:
        return ""
    try:
        with open(log, "rb") as f:
            txt = f.read()[-400:].decode(errors="replace").strip()
    except OSError:
        return ""
    return (": " + txt.replace("\n", " | ")) if txt else ""


def progress(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

PAIRS = {            # name: (-e implementation, -d implementation)
    "cc": ("c", "c"),
    "oo": ("ours", "ours"),
    "oc": ("ours", "c"),
    "co": ("c", "ours"),
}
PAIR_LABEL = {"cc": "C↔C", "oo": "ours↔ours", "oc": "ours -e → C -d",
              "co": "C -e → ours -d", "direct": "direct"}


def interleave(variants, rep):
    """Order of VARIANTS in repeat REP: forward on even repeats, reversed on odd."""
    return list(variants) if rep % 2 == 0 else list(reversed(variants))


class Runner:
    """Runs the metrics and collects raw samples."""

    def __init__(self, bench, cfg):
        self.b = bench
        self.cfg = cfg
        self.samples = {}        # metric -> variant -> [result dict]
        self.notes = []          # things the run could not do as asked

    def sample(self, metric, variant, fn):
        """Run FN(stack) with its own processes; record its result or error."""
        t0 = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                res = fn(stack)
        except SampleError as e:
            res = {"error": str(e)}
        except (OSError, ValueError) as e:
            res = {"error": "%s: %s" % (type(e).__name__, e)}
        res["wall_s"] = round(time.monotonic() - t0, 3)
        self.samples.setdefault(metric, {}).setdefault(variant, []).append(res)
        progress("  %-8s %-16s %s" % (metric, PAIR_LABEL.get(variant, variant),
                                     _short(res)))
        return res

    # 1 + 6: bulk one-stream throughput and CPU per GiB
    def bulk(self):
        size, cap = self.cfg["bulk_bytes"], self.cfg["bulk_cap"]
        progress("bulk: %d MiB one stream" % (size // MiB))

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "sink", pair, "bulk", size=size, cap=cap)
                if pair == "direct":
                    return rig.go(cap + 60)
                c0 = (cpu_seconds(rig.e.pid), cpu_seconds(rig.d.pid))
                res = rig.go(cap + 60)
                c1 = (cpu_seconds(rig.e.pid), cpu_seconds(rig.d.pid))
                res["cpu_e_s"] = c1[0] - c0[0]
                res["cpu_d_s"] = c1[1] - c0[1]
                gib = res.get("received", 0) / GiB
                if gib > 0:
                    res["cpu_e_s_per_gib"] = res["cpu_e_s"] / gib
                    res["cpu_d_s_per_gib"] = res["cpu_d_s"] / gib
                return res
            return fn

        for rep in range(self.cfg["repeats"]):
            self.sample("bulk", "direct", run("direct"))
            for pair in interleave(["cc", "oo", "oc", "co"], rep):
                self.sample("bulk", pair, run(pair))

    # 2: both directions at once
    def bidir(self):
        size, cap = self.cfg["bidir_bytes"], self.cfg["bulk_cap"]
        progress("bidir: %d MiB each way at once" % (size // MiB))

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "bidir", pair, "bidir",
                                 server_opts=["--size", str(size), "--cap", str(cap)],
                                 size=size, cap=cap)
                res = rig.go(cap + 60)
                # the target reports what it received once its side has closed
                line = _read_line(rig.srv.stdout, 10)
                if not line:
                    res["error"] = "target did not report"
                    return res
                rep = json.loads(line)
                res["target_received"] = rep["recv"]
                res["target_sent"] = rep["sent"]
                if rep.get("error"):
                    res["error"] = "target: " + rep["error"]
                elif rep["recv"] != res["sent"] or rep["sent"] != res["received"]:
                    res["error"] = "byte counts differ: %s" % rep
                return res
            return fn

        for rep in range(self.cfg["repeats"]):
            self.sample("bidir", "direct", run("direct"))
            for pair in interleave(["cc", "oo"], rep):
                self.sample("bidir", pair, run(pair))

    # 3: connections per second and setup time
    def conns(self):
        dur = self.cfg["conn_seconds"]
        progress("conns: %.1f s per run, 1 and 8 at once, PFS and -f" % dur)

        def run(pair, fast, threads):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "conns", fast=fast,
                                 threads=threads, cap=dur,
                                 count=self.cfg["conn_max"], timeout=10)
                return rig.go(dur + 40)
            return fn

        for rep in range(self.cfg["repeats"]):
            for threads in (1, 8):
                self.sample("conn%d" % threads, "direct", run("direct", False, threads))
                for fast in (False, True):
                    metric = "conn%d%s" % (threads, "f" if fast else "")
                    for pair in interleave(["cc", "oo"], rep):
                        self.sample(metric, pair, run(pair, fast, threads))

    # 4: echo round trip on a held connection
    def echo(self):
        n = self.cfg["echo_count"]
        progress("echo: %d round trips of 64 bytes" % n)

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "echo", count=n, size=64, cap=30)
                return rig.go(60)
            return fn

        for rep in range(self.cfg["repeats"]):
            self.sample("echo", "direct", run("direct"))
            for pair in interleave(["cc", "oo"], rep):
                self.sample("echo", pair, run(pair))

    # 7: -d CPU per PFS connection with one key and with three (--accept-key)
    def keys(self):
        dur = self.cfg["conn_seconds"]
        progress("keys: ours -d with 1 and 3 accepted keys, PFS, %.1f s per run" % dur)
        extra = []
        for n in (1, 2):
            path = os.path.join(self.b.tmp, "accept%d" % n)
            with open(path, "wb") as f:
                f.write(os.urandom(32))
            os.chmod(path, 0o600)
            extra += ["--accept-key", path]

        def run(d_opts):
            def fn(stack):
                rig = self.b.rig(stack, "echo", "oo", "conns", d_opts=d_opts, threads=1,
                                 cap=dur, count=self.cfg["conn_max"], timeout=10)
                c0 = cpu_seconds(rig.d.pid)
                res = rig.go(dur + 40)
                if res.get("ok"):
                    res["cpu_d_ms_per_conn"] = 1000 * (cpu_seconds(rig.d.pid) - c0) / res["ok"]
                return res
            return fn

        for rep in range(self.cfg["repeats"]):
            for variant in interleave(["key1", "key3"], rep):
                self.sample("keys", variant, run(extra if variant == "key3" else []))

    # 5: 100 concurrent connections
    def multi(self):
        n, size, cap = self.cfg["multi_conns"], self.cfg["multi_bytes"], self.cfg["multi_cap"]
        progress("multi: %d connections x %d KiB echoed" % (n, size // 1024))

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "multi", count=n, size=size,
                                 cap=cap, threads=8)
                if pair == "direct":
                    return rig.go(cap + 30)
                idle = (status_kib(rig.e.pid, "VmRSS"), status_kib(rig.d.pid, "VmRSS"))
                sampler = RssSampler({"e": rig.e.pid, "d": rig.d.pid})
                sampler.start()
                stack.callback(sampler.stop)
                try:
                    res = rig.go(cap + 30)
                finally:
                    sampler.stop()
                res["rss_e_mib"] = sampler.peak["e"] / 1024
                res["rss_d_mib"] = sampler.peak["d"] / 1024
                res["hwm_e_mib"] = status_kib(rig.e.pid, "VmHWM") / 1024
                res["hwm_d_mib"] = status_kib(rig.d.pid, "VmHWM") / 1024
                res["idle_rss_e_mib"] = idle[0] / 1024
                res["idle_rss_d_mib"] = idle[1] / 1024
                res["rss_samples"] = sampler.samples
                return res
            return fn

        for rep in range(self.cfg["repeats"]):
            self.sample("multi", "direct", run("direct"))
            for pair in interleave(["cc", "oo"], rep):
                self.sample("multi", pair, run(pair))


    # 8: many idle connections held at once
    def held(self):
        n, cap = self.cfg["held_conns"], self.cfg["held_cap"]
        note = raise_nofile(2 * n + 256)
        progress("held: %d connections opened (8 in flight, at most %d/s),"
                 " 100 B echoed on each, held %.1f s" % (n, self.cfg["held_rate"],
                                                         self.cfg["held_hold"]))
        if note:
            progress("  " + note)
            self.notes.append(note)

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "held", count=n, size=100,
                                 cap=cap, threads=8, rate=self.cfg["held_rate"],
                                 hold=self.cfg["held_hold"], timeout=10)
                sampler = StatusSampler({"e": rig.e.pid, "d": rig.d.pid})
                sampler.start()
                stack.callback(sampler.stop)
                try:
                    res = rig.go(cap + self.cfg["held_hold"] + 120)
                finally:
                    sampler.stop()
                for k in ("e", "d"):
                    res["hwm_%s_mib" % k] = status_kib(getattr(rig, k).pid, "VmHWM") / 1024
                    res["rss_%s_mib" % k] = sampler.peak[k]["VmRSS"] / 1024
                    res["threads_%s" % k] = sampler.peak[k]["Threads"]
                return res
            return fn

        for rep in range(self.cfg["held_repeats"]):
            for pair in interleave(["cc", "oo"], rep):
                self.sample("held", pair, run(pair))


def _short(res):
    """One-line summary of a sample for the progress log."""
    if "error" in res and len(res) <= 3:
        return "ERROR " + res["error"]
    keys = ["mib_s", "conn_s", "cpu_d_ms_per_conn", "setup_ms_p50", "p50_us", "p99_us", "seconds",
            "errors", "cpu_e_s_per_gib", "cpu_d_s_per_gib", "rss_e_mib",
            "rss_d_mib", "hwm_e_mib", "hwm_d_mib", "threads_e", "threads_d", "open_s",
            "error"]
    parts = []
    for k in keys:
        if k in res:
            v = res[k]
            parts.append("%s=%s" % (k, ("%.4g" % v) if isinstance(v, float) else v))
    return " ".join(parts)


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------

# (metric, value key, C variant, ours variant) -> one row
# target: ("ratio", op, x) compares ours/C; ("abs", op, x) compares ours alone.
ROWS = [
    # key, label, unit, better, metric, field, c_var, ours_var, target
    ("bulk_ref", "bulk 1 stream, direct (ref)", "MiB/s", "higher",
     "bulk", "mib_s", "direct", None, None),
    ("bulk_oo", "bulk 1 stream, ours↔ours", "MiB/s", "higher",
     "bulk", "mib_s", "cc", "oo", ("ratio", ">=", 0.95)),
    ("bulk_oc", "bulk 1 stream, ours -e → C -d", "MiB/s", "higher",
     "bulk", "mib_s", "cc", "oc", ("ratio", ">=", 0.8)),
    ("bulk_co", "bulk 1 stream, C -e → ours -d", "MiB/s", "higher",
     "bulk", "mib_s", "cc", "co", ("ratio", ">=", 0.8)),
    ("cpu_e", "CPU per GiB, -e daemon (bulk)", "s/GiB", "lower",
     "bulk", "cpu_e_s_per_gib", "cc", "oo", ("ratio", "<=", 1.2)),
    ("cpu_d", "CPU per GiB, -d daemon (bulk)", "s/GiB", "lower",
     "bulk", "cpu_d_s_per_gib", "cc", "oo", ("ratio", "<=", 1.2)),
    ("bidir_ref", "both ways at once, direct (ref)", "MiB/s", "higher",
     "bidir", "mib_s", "direct", None, None),
    ("bidir", "both ways at once, aggregate", "MiB/s", "higher",
     "bidir", "mib_s", "cc", "oo", None),
    ("conn1_ref", "conn/s 1 at a time, direct (ref)", "conn/s", "higher",
     "conn1", "conn_s", "direct", None, None),
    ("conn1", "conn/s PFS, 1 at a time", "conn/s", "higher",
     "conn1", "conn_s", "cc", "oo", ("ratio", ">=", 0.9)),
    ("conn8_ref", "conn/s 8 at once, direct (ref)", "conn/s", "higher",
     "conn8", "conn_s", "direct", None, None),
    ("conn8", "conn/s PFS, 8 at once", "conn/s", "higher",
     "conn8", "conn_s", "cc", "oo", ("ratio", ">=", 0.7)),
    ("conn1f", "conn/s -f, 1 at a time", "conn/s", "higher",
     "conn1f", "conn_s", "cc", "oo", ("ratio", ">=", 0.4)),
    ("conn8f", "conn/s -f, 8 at once", "conn/s", "higher",
     "conn8f", "conn_s", "cc", "oo", ("ratio", ">=", 0.35)),
    ("setup_ref", "setup time p50, direct (ref)", "ms", "lower",
     "conn1", "setup_ms_p50", "direct", None, None),
    ("setup", "setup time p50, PFS", "ms", "lower",
     "conn1", "setup_ms_p50", "cc", "oo", None),
    ("setupf", "setup time p50, -f", "ms", "lower",
     "conn1f", "setup_ms_p50", "cc", "oo", None),
    ("echo_ref", "64 B echo p50, direct (ref)", "µs", "lower",
     "echo", "p50_us", "direct", None, None),
    ("echo_p50", "64 B echo round trip p50", "µs", "lower",
     "echo", "p50_us", "cc", "oo", ("ratio", "<=", 1.5)),
    ("echo_p99", "64 B echo round trip p99", "µs", "lower",
     "echo", "p99_us", "cc", "oo", None),
    ("keys_cpu", "-d CPU per PFS conn, 3 keys (C col: 1 key)", "ms", "lower",
     "keys", "cpu_d_ms_per_conn", "key1", "key3", ("ratio", "<=", 1.10)),
    ("multi_ref", "100 conns, echo all, direct (ref)", "s", "lower",
     "multi", "seconds", "direct", None, None),
    ("multi_open", "100 conns, open all (8 in flight)", "s", "lower",
     "multi", "open_s", "cc", "oo", None),
    ("multi_time", "100 conns, echo all at once", "s", "lower",
     "multi", "seconds", "cc", "oo", ("ratio", "<=", 1.4)),
    ("multi_err", "100 conns, errors (sum)", "count", "lower",
     "multi", "errors", "cc", "oo", ("abs", "==", 0)),
    ("idle_e", "idle VmRSS -e (before 100 conns)", "MiB", "lower",
     "multi", "idle_rss_e_mib", "cc", "oo", None),
    ("rss_e", "100 conns, peak VmRSS -e", "MiB", "lower",
     "multi", "rss_e_mib", "cc", "oo", None),
    ("rss_d", "100 conns, peak VmRSS -d", "MiB", "lower",
     "multi", "rss_d_mib", "cc", "oo", None),
    ("hwm_e", "100 conns, VmHWM -e at end", "MiB", "lower",
     "multi", "hwm_e_mib", "cc", "oo", None),
    ("hwm_d", "100 conns, VmHWM -d at end", "MiB", "lower",
     "multi", "hwm_d_mib", "cc", "oo", None),
    ("held_open", "held conns, time to open all", "s", "lower",
     "held", "open_s", "cc", "oo", None),
    ("held_err", "held conns, errors (sum)", "count", "lower",
     "held", "errors", "cc", "oo", ("abs", "==", 0)),
    ("held_hwm_e", "held conns, peak RSS -e (VmHWM)", "MiB", "lower",
     "held", "hwm_e_mib", "cc", "oo", ("abs", "<=", 80)),
    ("held_hwm_d", "held conns, peak RSS -d (VmHWM)", "MiB", "lower",
     "held", "hwm_d_mib", "cc", "oo", ("abs", "<=", 80)),
    ("held_thr_e", "held conns, peak threads -e", "count", "lower",
     "held", "threads_e", "cc", "oo", None),
    ("held_thr_d", "held conns, peak threads -d", "count", "lower",
     "held", "threads_d", "cc", "oo", None),
]


HELD_TARGET_CONNS = 1000  # the held rows' 80 MiB target is for this many connections


def summarize(samples, held_conns=HELD_TARGET_CONNS):
    """Medians per row (sum for error counts) with ratio and PASS/FAIL."""
    rows = []
    for key, label, unit, better, metric, field, cv, ov, target in ROWS:
        if metric not in samples:
            continue
        if key.startswith("held_hwm") and held_conns != HELD_TARGET_CONNS:
            target = None
        m = samples[metric]

        def agg(var):
            if var is None or var not in m:
                return None, 0
            vals = [r[field] for r in m[var]
                    if isinstance(r.get(field), (int, float))]
            failed = sum(1 for r in m[var] if "error" in r and field not in r)
            if field == "errors":
                # a sample that failed outright counts as an error as well
                vals = vals + [1] * failed
                return (sum(vals) if vals else None), failed
            return (statistics.median(vals) if vals else None), failed

        c, cfail = agg(cv)
        o, ofail = agg(ov)
        ratio = (o / c) if (c and o is not None) else None
        status = ""
        tgt = ""
        if target:
            kind, op, x = target
            tgt = ("%s %g×" % ("≥" if op == ">=" else "≤" if op == "<=" else "=", x)
                   if kind == "ratio" else
                   "ours %s %g" % ("≤" if op == "<=" else "=" if op == "==" else "≥", x))
            val = ratio if kind == "ratio" else o
            if val is None:
                status = "n/a"
            else:
                ok = {">=": val >= x, "<=": val <= x, "==": val == x}[op]
                status = "PASS" if ok else "FAIL"
        rows.append({"key": key, "metric": label, "unit": unit, "better": better,
                     "c": c, "ours": o, "ratio": ratio, "target": tgt,
                     "status": status, "c_variant": cv, "ours_variant": ov,
                     "failed_samples": {"c": cfail, "ours": ofail}})
    return rows


def fmt_num(v):
    if v is None:
        return "—"
    if isinstance(v, int):
        return str(v)
    if v >= 1000:
        return "%.0f" % v
    if v >= 100:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3f" % v


def render_table(rows):
    head = ["metric", "unit", "C", "ours", "ours/C", "better", "target", "result"]
    body = []
    for r in rows:
        if r["ours_variant"] is None:       # reference row
            c_txt = fmt_num(r["c"])
            o_txt, ratio, better = "(ref)", "", r["better"]
        else:
            c_txt, o_txt = fmt_num(r["c"]), fmt_num(r["ours"])
            ratio = ("%.2f×" % r["ratio"]) if r["ratio"] is not None else "—"
            better = r["better"]
        fails = r["failed_samples"]
        if fails["c"] or fails["ours"]:
            o_txt += " (!%d/%d failed)" % (fails["c"], fails["ours"])
        body.append([r["metric"], r["unit"], c_txt, o_txt, ratio, better,
                     r["target"], r["status"]])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    right = {2, 3, 4}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    return "\n".join(out)


# --------------------------------------------------------------------------
# Machine facts and main
# --------------------------------------------------------------------------

def machine_info(bench):
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from importlib import metadata
        for dist in ("pycryptodomex", "pycryptodome"):
            try:
                info["cryptodome"] = metadata.version(dist) + " (%s)" % dist
                break
            except metadata.PackageNotFoundError:
                continue
    except ImportError:
        pass
    for name, cmd in bench.impls.items():
        try:
            r = subprocess.run(cmd + ["-v"], capture_output=True, timeout=20)
            info["version_" + name] = (r.stderr + r.stdout).decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["version_" + name] = "unavailable: %s" % e
    info["cmd_c"] = bench.impls["c"]
    info["cmd_ours"] = bench.impls["ours"]
    return info


def config(quick):
    if quick:
        return {"repeats": 2, "bulk_bytes": 64 * MiB, "bidir_bytes": 16 * MiB,
                "bulk_cap": 10.0, "conn_seconds": 1.0, "conn_max": 20000,
                "echo_count": 500, "multi_conns": 100, "multi_bytes": 256 * 1024,
                "multi_cap": 30.0, "held_conns": 1000, "held_rate": 1000.0,
                "held_hold": 1.0, "held_cap": 120.0, "held_repeats": 1}
    return {"repeats": 3, "bulk_bytes": 256 * MiB, "bidir_bytes": 64 * MiB,
            "bulk_cap": 30.0, "conn_seconds": 2.0, "conn_max": 20000,
            "echo_count": 2000, "multi_conns": 100, "multi_bytes": 1 * MiB,
            "multi_cap": 60.0, "held_conns": 1000, "held_rate": 1000.0,
            "held_hold": 2.0, "held_cap": 120.0, "held_repeats": 1}


METRICS = ["bulk", "bidir", "conns", "echo", "multi", "held", "keys"]


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Benchmark C spiped against spiped.py (loopback only).")
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes and fewer repeats (about a minute)")
    ap.add_argument("--json", metavar="OUT",
                    help="where to write raw samples (default: a new temporary"
                         " file, whose path is printed)")
    ap.add_argument("--ours", default=os.path.join(ROOT, "spiped.py"), metavar="PATH",
                    help="our implementation; *.py runs with this Python")
    ap.add_argument("--c", default="/usr/bin/spiped", metavar="PATH",
                    help="C spiped binary (default %(default)s)")
    ap.add_argument("--only", default=",".join(METRICS),
                    help="comma-separated subset of: " + ", ".join(METRICS))
    ap.add_argument("--repeats", type=int, default=0,
                    help="override the number of repeats")
    ap.add_argument("--held-conns", type=int, default=0, metavar="N",
                    help="connections of the held phase (default 1000; 5000 for the"
                         " large run)")
    args = ap.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = [m for m in only if m not in METRICS]
    if bad:
        ap.error("unknown metric(s): %s" % ", ".join(bad))
    cfg = config(args.quick)
    if args.repeats > 0:
        cfg["repeats"] = args.repeats
    if args.held_conns > 0:
        cfg["held_conns"] = args.held_conns
        cfg["held_cap"] = max(cfg["held_cap"], args.held_conns / 20.0)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    start = time.monotonic()
    bench = Bench(args)
    runner = Runner(bench, cfg)
    info = {}
    interrupted = False
    try:
        info = machine_info(bench)
        progress("C: %s | ours: %s" % (info.get("version_c"), info.get("version_ours")))
        for m in METRICS:
            if m in only:
                getattr(runner, m)()
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted; writing what was measured so far")
    finally:
        bench.cleanup()
    wall = time.monotonic() - start
    info["loadavg_end"] = os.getloadavg()
    rows = summarize(runner.samples, cfg["held_conns"])
    table = render_table(rows)
    print(table)
    print("\nmedian of %d repeat(s)%s; ratio = ours / C; wall time %.0f s"
          % (cfg["repeats"], " (--quick)" if args.quick else "", wall))
    if "held" in runner.samples:
        print("held conns: %d connections, %d sample(s) each"
              % (cfg["held_conns"], cfg["held_repeats"]))
    for note in runner.notes:
        print("note: " + note)
    doc = {"machine": info, "config": cfg, "quick": args.quick, "notes": runner.notes,
           "interrupted": interrupted, "wall_seconds": round(wall, 1),
           "rows": rows, "samples": runner.samples}
    if args.json:
        path = args.json
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(path, "w")
    else:
        fd, path = tempfile.mkstemp(prefix="spiped-bench-", suffix=".json")
        f = os.fdopen(fd, "w")
    with f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("raw samples: %s" % path)
    return 130 if interrupted else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        server_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2:])
    else:
        sys.exit(main())
