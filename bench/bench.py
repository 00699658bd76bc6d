#!/usr/bin/env python3
"""Compare the throughput, latency and footprint of C spiped and spiped.py.

Every measurement runs on 127.0.0.1 with freshly started daemons:

    load client --> [spiped -e] --> [spiped -d] --> target server
    (process)        (daemon)        (daemon)       (process)

The load client and the target server are separate Python processes run from
load.py.  Each metric is also measured with the client talking to the target
directly (no spiped), printed as a reference row: the ceiling of the harness
on this machine.  Where it applies, the same load also goes through a pair of
floor relays (floor.py: the shape of spiped's server without crypto or
handshake), printed as the floor column.

C, ours and the floor are interleaved (C, ours, floor, floor, ours, C, ...) and
every repeat starts new daemons.  The table shows the median over repeats, the
ratios ours/C and ours/floor, which direction is better, the target for ours/C
and PASS/FAIL.  All raw samples, medians and machine facts go to a JSON file.

Files: bench.py (this: processes and phases), load.py (load generators),
floor.py (floor relay), measure.py (psutil), report.py (table, JSON).
Needs psutil: pip install -e '.[bench]'.  See bench/README.md.
"""

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import psutil
except ImportError:
    sys.exit("bench.py: psutil is missing; install it with: pip install -e '.[bench]'")

import load
import measure
import report

HOST = load.HOST
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20
GiB = 1 << 30
ECHO_WARMUP = 20            # round trips load.py's echo client makes before timing
CONNTRACK = "/proc/sys/net/netfilter/nf_conntrack_"  # max, count: where the host tracks


# --------------------------------------------------------------------------
# Processes of one sample
# --------------------------------------------------------------------------

class SampleError(Exception):
    """One sample failed; it is recorded and the run goes on."""


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
        self.python = args.python or sys.executable
        self.codec = args.ours
        floor = os.path.join(HERE, "floor.py")
        if args.start == "installed" and args.ours.endswith(".py"):  # from byte code, as installed
            self.codec = os.path.join(self.installed_copy(args.ours), os.path.basename(args.ours))
        self.impls = {"c": self._cmd(args.c), "ours": self._cmd(args.ours),
                      "floor": self._cmd(floor)}
        if args.also_python:   # ours again, on the other interpreter (its Cryptodome back end)
            self.impls["ours2"] = self._cmd(args.ours, args.also_python)
        self.nlog = 0
        self.scrapes = {"ok": 0, "failed": 0}   # --scrape's requests

    def _cmd(self, path, python=None):
        """Command prefix for an implementation: *.py runs with PYTHON (default --python).

        With --start installed (the default) a .py file runs as an installed
        program does, from a copy's cached byte code (runpy as __main__);
        with --start copied it is compiled at every start, as "python3 FILE" does.
        """
        if not path.endswith(".py"):
            return [path]
        if self.args.start == "copied":
            return [python or self.python, path]
        folder = self.installed_copy(path)
        name = os.path.basename(path)[:-3]
        return [python or self.python, "-c", "import runpy, sys; sys.path.insert(0, %r);"
                " runpy.run_module(%r, run_name='__main__')" % (folder, name)]

    # -- process management -------------------------------------------------

    def spawn(self, stack, cmd, **kw):
        """Popen CMD; it is killed when STACK unwinds (and at cleanup)."""
        p = subprocess.Popen(cmd, preexec_fn=load._die_with_parent, **kw)
        self.procs.append(p)
        stack.callback(self.kill, p)
        return p

    def kill(self, p):
        """SIGKILL P (and any children it made) and reap it."""
        if p.poll() is None:
            measure.kill_tree(p.pid)
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
        import shutil
        for p in list(self.procs):
            self.kill(p)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def installed_copy(self, source=None):
        """A folder holding a copy of SOURCE (--ours) and its byte-code cache, as an install
        leaves it: an installed program imports its module, and the
        interpreter loads the cached byte code instead of compiling it."""
        import importlib.util
        import py_compile
        import shutil
        source = source or self.args.ours
        folder = os.path.join(self.tmp, "installed")
        path = os.path.join(folder, os.path.basename(source))
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            shutil.copy(source, path)
            py_compile.compile(path, cfile=importlib.util.cache_from_source(path), doraise=True)
        return folder

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
            if measure.listening_on(p.pid, port):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        raise SampleError("%s not listening on %d after %.0f s%s"
                          % (what, port, timeout, _log_tail(log)))

    # -- one sample's processes ---------------------------------------------

    def rig(self, stack, server_mode, pair, client_mode, fast=False,
            server_opts=(), d_opts=(), to_d=False, **client_opts):
        """Start target, daemons (unless PAIR is "direct") and a waiting client.

        The client talks to the -e daemon, or with TO_D straight to the -d one.

        Everything is spawned at once, then each listener is awaited through
        /proc/net/tcp.  Returns a Rig; rig.go(wall) runs the client.
        """
        t0 = time.monotonic()
        helper = [sys.executable, "-S", os.path.join(HERE, "load.py")]
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
            if dec is not None:
                d, dlog = self._daemon(stack, dec, "d", dport, tport, fast, d_opts)
                waits.append((d, dport, "%s -d" % dec, dlog))
            else:          # one relay alone, straight to the target (floor.py)
                dport = tport
            e, elog = self._daemon(stack, enc, "e", eport, dport, fast)
            waits.append((e, eport, "%s -e" % enc, elog))
            entry = dport if to_d else eport
        cmd = helper + ["_client", client_mode, "--port", str(entry)]
        for k, v in client_opts.items():
            cmd += ["--" + k, str(v)]
        cli = self.spawn(stack, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        for w in waits:
            self.wait_listening(*w)
        rig = Rig(self, srv, e, d, cli, client_mode)
        rig.tport = tport
        rig.startup_s = time.monotonic() - t0
        return rig

    def _daemon(self, stack, impl, mode, src, tgt, fast, extra=()):
        """Spawn one spiped daemon (-F, -n 0, then EXTRA); its output goes to a log file."""
        self.nlog += 1
        log = os.path.join(self.tmp, "daemon%d.log" % self.nlog)
        if impl in ("floor", "floorc"):   # a plain relay: no key, no handshake, no options
            cmd = self.impls["floor"] + ["-s", "[%s]:%d" % (HOST, src),
                                         "-t", "[%s]:%d" % (HOST, tgt)]
            if impl == "floorc":           # ... that seals and opens with our codecs
                cmd += ["--codec", self.codec, "-" + mode]
        else:
            cmd = self.impls[impl] + [
                "-" + mode, "-s", "[%s]:%d" % (HOST, src), "-t", "[%s]:%d" % (HOST, tgt),
                "-k", self.key, "-F", "-n", "0"] + (["-f"] if fast else []) + list(extra)
        port = self.free_port() if impl == "ours" and self.args.scrape else None
        if port:
            cmd += ["--metrics", "[%s]:%d" % (HOST, port)]
        with open(log, "wb") as lf:
            p = self.spawn(stack, cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
        if port:
            self.scrape(stack, p, port)
        return p, log

    def scrape(self, stack, p, port):
        """GET /metrics from P's --metrics PORT once a second until STACK unwinds.

        What Prometheus would do to a daemon under load; failures are counted
        in self.scrapes ("failed") once the endpoint answered for the first time.
        """
        import threading
        import urllib.request
        stop = threading.Event()
        counts = self.scrapes

        def run():
            url = "http://%s:%d/metrics" % (HOST, port)
            answered = False
            while not stop.wait(1.0):
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        r.read()
                    answered = True
                    counts["ok"] += 1
                except OSError:
                    if answered and p.poll() is None:
                        counts["failed"] += 1
        t = threading.Thread(target=run, daemon=True)
        t.start()
        stack.callback(t.join, 10)
        stack.callback(stop.set)


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
    "o2": ("ours2", "ours2"),            # ours on --also-python (the other back end)
    report.FLOOR_ONE: ("floor", None),   # one floor relay alone, in front of the target
    "oc": ("ours", "c"),
    "co": ("c", "ours"),
    report.FLOOR: ("floor", "floor"),    # floor.py twice: a relay, no crypto
    report.FLOOR_CODEC: ("floorc", "floorc"),  # the same, sealing and opening with ours
}
PAIR_LABEL = {"cc": "C↔C", "oo": "ours↔ours", "o2": "ours↔ours (2nd)", "oc": "ours -e → C -d",
              "c": "C", "ours": "ours", "f2": "floor (2nd)",
              report.FLOOR_ONE: "floor alone",
              "co": "C -e → ours -d", "direct": "direct", report.FLOOR: "floor↔floor",
              report.FLOOR_CODEC: "floor+codec"}
FF = report.FLOOR


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
        self.conntrack_noted = False

    def settle_conntrack(self, fraction=0.5, cap=130.0):
        """Wait until the kernel's connection-tracking table is at most FRACTION full.

        A host with a NAT rule (podman's, say) tracks every loopback
        connection for 120 s after it closes, and a full table drops SYNs:
        the conns phases open enough to fill 262,144 entries, and samples
        then stalled in 10 s timeouts.  Seconds waited (0 without tracking).
        """
        try:
            with open(CONNTRACK + "max") as f:
                limit = int(f.read())
        except (OSError, ValueError):
            return 0.0
        t0 = time.monotonic()
        while time.monotonic() - t0 < cap:
            with open(CONNTRACK + "count") as f:
                if int(f.read()) <= fraction * limit:
                    break
            time.sleep(1.0)
        waited = time.monotonic() - t0
        if waited >= 1.0 and not self.conntrack_noted:
            self.conntrack_noted = True
            self.notes.append("connection tracking is on (a NAT rule): samples wait for its"
                              " table to be at most half full (nf_conntrack_max %d)" % limit)
        return waited

    def sample(self, metric, variant, fn):
        """Run FN(stack) with its own processes; record its result or error."""
        waited = self.settle_conntrack()
        t0 = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                res = fn(stack)
        except SampleError as e:
            res = {"error": str(e)}
        except (OSError, ValueError) as e:
            res = {"error": "%s: %s" % (type(e).__name__, e)}
        res["wall_s"] = round(time.monotonic() - t0, 3)
        if waited >= 1.0:
            res["conntrack_wait_s"] = round(waited, 1)
        self.samples.setdefault(metric, {}).setdefault(variant, []).append(res)
        progress("  %-8s %-16s %s" % (metric, PAIR_LABEL.get(variant, variant),
                                     report.short_line(res)))
        return res

    def sample_each(self, metric, fn):
        """Run FN(stack), which returns {variant: [times in ms]}; record each variant's median."""
        t0 = time.monotonic()
        try:
            with contextlib.ExitStack() as stack:
                found = fn(stack)
        except (SampleError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            found = None
            error = "%s: %s" % (type(e).__name__, e)
        wall = round(time.monotonic() - t0, 3)
        for variant in (found or {}):
            times = sorted(found[variant])
            res = {"ms": statistics.median(times), "ms_all": [round(t, 2) for t in times],
                   "wall_s": wall}
            self.samples.setdefault(metric, {}).setdefault(variant, []).append(res)
            progress("  %-10s %-16s %s" % (metric, PAIR_LABEL.get(variant, variant),
                                           report.short_line(res)))
        if found is None:
            self.samples.setdefault(metric, {}).setdefault("c", []).append({"error": error})
            progress("  %-10s ERROR %s" % (metric, error))

    def need_files(self, conns):
        """Raise RLIMIT_NOFILE for CONNS connections; a shortfall goes to the log and notes.

        Returns how many connections the limit allows (a relay holds two
        descriptors per connection): CONNS, or fewer where it could not be raised.
        """
        note = raise_nofile(2 * conns + 256)
        if note:
            progress("  " + note)
            self.notes.append(note)
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft >= 2 * conns + 256:
            return conns
        return max(1, (soft - 64) // 2)  # a daemon needs a few more of its own

    @staticmethod
    def d_cpu_per_conn(rig, wall):
        """Run RIG's client; add the -d daemon's CPU ms per connection served."""
        c0 = measure.cpu_seconds(rig.d.pid)
        res = rig.go(wall)
        if res.get("ok"):
            res["cpu_d_ms_per_conn"] = 1000 * (measure.cpu_seconds(rig.d.pid) - c0) / res["ok"]
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
                c0 = (measure.cpu_seconds(rig.e.pid), measure.cpu_seconds(rig.d.pid))
                res = rig.go(cap + 60)
                c1 = (measure.cpu_seconds(rig.e.pid), measure.cpu_seconds(rig.d.pid))
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
                    # the floor has no handshake: run once, under the PFS metric
                    pairs = ["cc", "oo"] if fast else ["cc", "oo", FF]
                    for pair in interleave(pairs, rep):
                        self.sample(metric, pair, run(pair, fast, threads))

    # 4: echo round trip on a held connection
    def echo(self):
        n = self.cfg["echo_count"]
        progress("echo: %d round trips of 64 bytes" % n)

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "echo", count=n, size=64, cap=30)
                if pair == "direct":
                    return rig.go(60)
                c0 = (measure.cpu_seconds(rig.e.pid), measure.cpu_seconds(rig.d.pid))
                res = rig.go(60)
                c1 = (measure.cpu_seconds(rig.e.pid), measure.cpu_seconds(rig.d.pid))
                # whole client run: connect (+ handshake), warm-up and round trips
                trips = res.get("count", 0) + ECHO_WARMUP
                if res.get("count"):
                    res["cpu_e_us_per_rt"] = 1e6 * (c1[0] - c0[0]) / trips
                    res["cpu_d_us_per_rt"] = 1e6 * (c1[1] - c0[1]) / trips
                return res
            return fn

        pairs = ["cc", "oo", FF]
        if self.b.args.ours.endswith(".py"):   # floor.py can load its codecs
            pairs.append(report.FLOOR_CODEC)
        if "ours2" in self.b.impls:
            pairs.append("o2")
        for rep in range(self.cfg["repeats"]):
            self.sample("echo", "direct", run("direct"))
            for pair in interleave(pairs, rep):
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
                return self.d_cpu_per_conn(rig, dur + 40)
            return fn

        for rep in range(self.cfg["repeats"]):
            for variant in interleave(["key1", "key3"], rep):
                self.sample("keys", variant, run(extra if variant == "key3" else []))

    # 5: 100 concurrent connections
    def multi(self, metric="multi", n=None, size=None):
        n = n or self.cfg["multi_conns"]
        size = size or self.cfg["multi_bytes"]
        cap = self.cfg["multi_cap"]
        progress("%s: %d connections x %d KiB echoed" % (metric, n, size // 1024))
        self.need_files(n)

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "multi", count=n, size=size,
                                 cap=cap, threads=8)
                if pair == "direct":
                    return rig.go(cap + 30)
                idle = (measure.rss_kib(rig.e.pid), measure.rss_kib(rig.d.pid))
                sampler = measure.Sampler({"e": rig.e.pid, "d": rig.d.pid})
                sampler.start()
                stack.callback(sampler.stop)
                try:
                    res = rig.go(cap + 30)
                finally:
                    sampler.stop()
                res["rss_e_mib"] = sampler.peak_rss["e"] / 1024
                res["rss_d_mib"] = sampler.peak_rss["d"] / 1024
                res["hwm_e_mib"] = measure.hwm_kib(rig.e.pid) / 1024
                res["hwm_d_mib"] = measure.hwm_kib(rig.d.pid) / 1024
                res["idle_rss_e_mib"] = idle[0] / 1024
                res["idle_rss_d_mib"] = idle[1] / 1024
                res["rss_samples"] = sampler.samples
                return res
            return fn

        for rep in range(self.cfg["repeats"]):
            self.sample(metric, "direct", run("direct"))
            for pair in interleave(["cc", "oo", FF], rep):
                self.sample(metric, pair, run(pair))

    # 9: many small connections busy at once: peak memory
    def busy(self):
        self.multi("busy", self.cfg["busy_conns"], self.cfg["busy_bytes"])

    # 10: -d CPU per connection that connects and closes without a byte
    def unauth(self):
        n, cap = self.cfg["unauth_count"], self.cfg["conn_seconds"] * 5
        progress("unauth: %d connections to -d, each closed without a byte" % n)

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "unauth", to_d=True, count=n,
                                 cap=cap, timeout=10)
                return self.d_cpu_per_conn(rig, cap + 40)
            return fn

        for rep in range(self.cfg["repeats"]):
            for pair in interleave(["cc", "oo", FF], rep):
                self.sample("unauth", pair, run(pair))


    # 11: a burst of simultaneous connects straight to -d -n 0
    def burst(self):
        n, cap = self.cfg["burst_conns"], self.cfg["burst_cap"]
        progress("burst: %d connects at once to -d -n 0, first byte within %.0f s" % (n, cap))
        self.need_files(n)

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "burst", to_d=True, count=n, cap=cap)
                return rig.go(cap + 30)
            return fn

        for rep in range(self.cfg["repeats"]):
            for pair in interleave(["cc", "oo"], rep):
                self.sample("burst", pair, run(pair))

    # 12: spipe's start-up: one request through a C -d
    def spipe(self):
        runs = self.cfg["spipe_runs"]
        progress("spipe: one request through a C -d, %d runs per sample" % runs)
        b = self.b
        installed = b.installed_copy(b.args.ours)
        spipe_c = os.path.join(os.path.dirname(b.args.c), "spipe")
        ours_py = b.args.ours
        cipher = "from Cryptodome.Cipher import AES"
        variants = {   # metric -> variant -> command without -t/-k
            "spipe_inst": {
                "c": [spipe_c],
                "ours": [b.python, "-c", "import sys; sys.path.insert(0, %r); from spiped import"
                         " spipe_entry; sys.exit(spipe_entry())" % installed],
                FF: [b.python, "-c", cipher]},
            "spipe_copy": {
                "c": [spipe_c],
                "ours": [b.python, ours_py, "spipe"],
                FF: [b.python, "-c", "%s; compile(open(%r, 'rb').read(), %r, 'exec')"
                     % (cipher, ours_py, ours_py)]},
        }
        if "ours2" in b.impls:
            variants["spipe_inst"]["o2"] = [b.args.also_python] + variants["spipe_inst"]["ours"][1:]
            variants["spipe_copy"]["o2"] = [b.args.also_python, ours_py, "spipe"]
            variants["spipe_inst"]["f2"] = [b.args.also_python, "-c", cipher]
            variants["spipe_copy"]["f2"] = [b.args.also_python] + variants["spipe_copy"][FF][1:]

        def run(metric, table):
            """All of TABLE's commands in turn, RUNS times: each run sees the same load."""
            def fn(stack):
                rig = b.rig(stack, "echo", "direct", "echo", count=0)
                dport = b.free_port()
                d, dlog = b._daemon(stack, "c", "d", dport, rig.tport, False)
                b.wait_listening(d, dport, "C -d", dlog)
                times = {v: [] for v in table}
                for i in range(runs):
                    for variant in interleave(list(table), i):
                        floor = variant in (FF, "f2")
                        args = [] if floor else ["-t", "[%s]:%d" % (HOST, dport), "-k", b.key]
                        t0 = time.perf_counter()
                        r = subprocess.run(table[variant] + args, input=b"ping\n",
                                           capture_output=True, timeout=30)
                        times[variant].append((time.perf_counter() - t0) * 1000)
                        if r.returncode != 0 or (not floor and r.stdout != b"ping\n"):
                            raise SampleError("%s %s: exit %s, %r" % (
                                metric, variant, r.returncode, r.stderr[-200:]))
                return times
            return fn

        for rep in range(self.cfg["repeats"]):
            for metric, table in variants.items():
                self.sample_each(metric, run(metric, table))

    # 13: 10,000 held connections through one of ours with C on the other side
    def held10k(self):
        n = self.cfg["held10k_conns"]
        fit = self.need_files(n)
        if fit < n:   # a hard limit this process may not raise (no CAP_SYS_RESOURCE)
            note = "held10k: %d connections held, not %d: the file limit allows no more" % (fit, n)
            progress("  " + note)
            self.notes.append(note)
        # No C↔C: here its pair had not opened 10,000 after four minutes (its
        # event loop slows with every connection it holds); the target is the floor.
        self.held("held10k", fit, ["oc", report.FLOOR_ONE])

    # 8: many idle connections held at once
    def held(self, metric="held", n=None, pairs=None):
        n = n or self.cfg["held_conns"]
        cap = max(self.cfg["held_cap"], n / 20.0)
        progress("%s: %d connections opened (8 in flight, at most %d/s),"
                 " 100 B echoed on each, held %.1f s" % (metric, n, self.cfg["held_rate"],
                                                         self.cfg["held_hold"]))
        self.need_files(n)

        def run(pair):
            def fn(stack):
                rig = self.b.rig(stack, "echo", pair, "held", count=n, size=100,
                                 cap=cap, threads=8, rate=self.cfg["held_rate"],
                                 hold=self.cfg["held_hold"], timeout=10)
                daemons = {k: getattr(rig, k).pid for k in ("e", "d") if getattr(rig, k)}
                sampler = measure.Sampler(daemons, interval=0.1, whole_tree=False)
                sampler.start()
                stack.callback(sampler.stop)
                try:
                    res = rig.go(cap + self.cfg["held_hold"] + 120)
                finally:
                    sampler.stop()
                for k in daemons:
                    res["hwm_%s_mib" % k] = measure.hwm_kib(getattr(rig, k).pid) / 1024
                    res["rss_%s_mib" % k] = sampler.peak_rss[k] / 1024
                    res["threads_%s" % k] = sampler.peak_threads[k]
                return res
            return fn

        for rep in range(self.cfg["held_repeats"]):
            for pair in interleave(pairs or ["cc", "oo", FF], rep):
                self.sample(metric, pair, run(pair))


def config(quick):
    if quick:
        return {"repeats": 2, "bulk_bytes": 64 * MiB, "bidir_bytes": 16 * MiB,
                "bulk_cap": 10.0, "conn_seconds": 1.0, "conn_max": 20000,
                "echo_count": 2000, "multi_conns": 100, "multi_bytes": 256 * 1024,
                "multi_cap": 30.0, "held_conns": 1000, "held_rate": 1000.0,
                "held_hold": 1.0, "held_cap": 120.0, "held_repeats": 1,
                "busy_conns": 1000, "busy_bytes": 16 * 1024, "unauth_count": 1000,
                "burst_conns": 500, "burst_cap": 10.0, "spipe_runs": 7,
                "held10k_conns": 10000}
    return {"repeats": 3, "bulk_bytes": 256 * MiB, "bidir_bytes": 64 * MiB,
            "bulk_cap": 30.0, "conn_seconds": 2.0, "conn_max": 20000,
            "echo_count": 5000, "multi_conns": 100, "multi_bytes": 1 * MiB,
            "multi_cap": 60.0, "held_conns": 1000, "held_rate": 1000.0,
            "held_hold": 2.0, "held_cap": 120.0, "held_repeats": 1,
            "busy_conns": 1000, "busy_bytes": 16 * 1024, "unauth_count": 3000,
            "burst_conns": 500, "burst_cap": 10.0, "spipe_runs": 11,
            "held10k_conns": 10000}


METRICS = ["bulk", "bidir", "conns", "echo", "multi", "busy", "held", "unauth", "keys",
           "burst", "spipe", "held10k"]
HEAVY = ["held10k"]   # not in --quick unless named in --only


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
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: " + ", ".join(METRICS)
                         + " (default: all; --quick leaves out " + ", ".join(HEAVY) + ")")
    ap.add_argument("--python", metavar="PY",
                    help="interpreter for ours and the floor (default: this one); its"
                         " Cryptodome's back end (cffi or ctypes) is ours' back end")
    ap.add_argument("--start", choices=["installed", "copied"], default="installed",
                    help="how ours and the floor start: from a copy's cached byte code as an"
                         " installed program does (default), or compiled at every start as"
                         " 'python3 FILE' is")
    ap.add_argument("--also-python", metavar="PY",
                    help="a second interpreter, whose Cryptodome is on the other back end:"
                         " the echo and spipe rows run ours on it too")
    ap.add_argument("--repeats", type=int, default=0,
                    help="override the number of repeats")
    ap.add_argument("--scrape", action="store_true",
                    help="start ours with --metrics and GET /metrics from each of our"
                         " daemons once a second during every sample")
    ap.add_argument("--held-conns", type=int, default=0, metavar="N",
                    help="connections of the held phase (default 1000; 5000 for the"
                         " large run)")
    args = ap.parse_args(argv)
    if args.only is None:
        args.only = ",".join(m for m in METRICS if not (args.quick and m in HEAVY))
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = [m for m in only if m not in METRICS]
    if bad:
        ap.error("unknown metric(s): %s" % ", ".join(bad))
    cfg = config(args.quick)
    if args.repeats > 0:
        cfg["repeats"] = args.repeats
    if args.held_conns > 0:
        cfg["held_conns"] = args.held_conns

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    start = time.monotonic()
    bench = Bench(args)
    runner = Runner(bench, cfg)
    info = {}
    interrupted = False
    try:
        info = report.machine_info(bench.impls)
        info["psutil"] = psutil.__version__
        info["backend"] = report.backend_of(bench.python)
        if args.also_python:
            info["backend2"] = report.backend_of(args.also_python)
        progress("ours on Cryptodome's %s back end%s" % (info["backend"], (
            ", and on %s (--also-python)" % info["backend2"]) if args.also_python else ""))
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
    rows = report.summarize(runner.samples, cfg["held_conns"], info.get("backend", "?"),
                            info.get("backend2", "?"))
    table = report.render_table(rows)
    print(table)
    print("\nmedian of %d repeat(s)%s; ratio = ours / C, ours / floor; wall time %.0f s"
          % (cfg["repeats"], " (--quick)" if args.quick else "", wall))
    if "held" in runner.samples:
        print("held conns: %d connections, %d sample(s) each"
              % (cfg["held_conns"], cfg["held_repeats"]))
    if args.scrape:
        print("--scrape: %(ok)d scrapes answered, %(failed)d failed" % bench.scrapes)
    for note in runner.notes:
        print("note: " + note)
    doc = {"machine": info, "config": cfg, "quick": args.quick, "notes": runner.notes,
           "scrapes": bench.scrapes if args.scrape else None,
           "interrupted": interrupted, "wall_seconds": round(wall, 1),
           "rows": rows, "samples": runner.samples}
    path = report.write_json(doc, args.json)
    print("raw samples: %s" % path)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
