"""The bench's table, its progress lines and its JSON record."""

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile


def short_line(res):
    """One-line summary of a sample for the progress log."""
    if "error" in res and len(res) <= 3:
        return "ERROR " + res["error"]
    keys = ["mib_s", "conn_s", "ms", "served", "all_s", "cpu_d_ms_per_conn", "setup_ms_p50", "p50_us", "p99_us",
            "cpu_e_us_per_rt", "cpu_d_us_per_rt", "seconds",
            "errors", "cpu_e_s_per_gib", "cpu_d_s_per_gib", "rss_e_mib",
            "rss_d_mib", "hwm_e_mib", "hwm_d_mib", "threads_e", "threads_d", "open_s",
            "error"]
    parts = []
    for k in keys:
        if k in res:
            v = res[k]
            parts.append("%s=%s" % (k, ("%.4g" % v) if isinstance(v, float) else v))
    return " ".join(parts)


# (metric, value key, C variant, ours variant) -> one row
# target: ("ratio", op, x) compares ours/C; ("abs", op, x) compares ours alone;
# ("over", op, x) compares ours minus the floor (busy memory: within the floor + 10 MiB).
ROWS = [
    # key, label, unit, better, metric, field, c_var, ours_var, target, floor metric
    ("bulk_ref", "bulk 1 stream, direct (ref)", "MiB/s", "higher",
     "bulk", "mib_s", "direct", None, None, None),
    ("bulk_oo", "bulk 1 stream, ours↔ours", "MiB/s", "higher",
     "bulk", "mib_s", "cc", "oo", ("ratio", ">=", 1.0), None),
    ("bulk_oc", "bulk 1 stream, ours -e → C -d", "MiB/s", "higher",
     "bulk", "mib_s", "cc", "oc", ("ratio", ">=", 0.8), None),
    ("bulk_co", "bulk 1 stream, C -e → ours -d", "MiB/s", "higher",
     "bulk", "mib_s", "cc", "co", ("ratio", ">=", 0.8), None),
    ("cpu_e", "CPU per GiB, -e daemon (bulk)", "s/GiB", "lower",
     "bulk", "cpu_e_s_per_gib", "cc", "oo", ("ratio", "<=", 1.2), None),
    ("cpu_d", "CPU per GiB, -d daemon (bulk)", "s/GiB", "lower",
     "bulk", "cpu_d_s_per_gib", "cc", "oo", ("ratio", "<=", 1.2), None),
    ("bidir_ref", "both ways at once, direct (ref)", "MiB/s", "higher",
     "bidir", "mib_s", "direct", None, None, None),
    ("bidir", "both ways at once, aggregate", "MiB/s", "higher",
     "bidir", "mib_s", "cc", "oo", None, None),
    ("conn1_ref", "conn/s 1 at a time, direct (ref)", "conn/s", "higher",
     "conn1", "conn_s", "direct", None, None, None),
    ("conn1", "conn/s PFS, 1 at a time", "conn/s", "higher",
     "conn1", "conn_s", "cc", "oo", ("ratio", ">=", 0.9), "conn1"),
    ("conn8_ref", "conn/s 8 at once, direct (ref)", "conn/s", "higher",
     "conn8", "conn_s", "direct", None, None, None),
    ("conn8", "conn/s PFS, 8 at once", "conn/s", "higher",
     "conn8", "conn_s", "cc", "oo", ("ratio", ">=", 0.75), "conn8"),
    ("conn1f", "conn/s -f, 1 at a time", "conn/s", "higher",
     "conn1f", "conn_s", "cc", "oo", (("ratio", ">=", 0.45), ("floor", ">=", 0.9)), "conn1"),
    ("conn8f", "conn/s -f, 8 at once", "conn/s", "higher",
     "conn8f", "conn_s", "cc", "oo", ("ratio", ">=", 0.35), "conn8"),
    ("setup_ref", "setup time p50, direct (ref)", "ms", "lower",
     "conn1", "setup_ms_p50", "direct", None, None, None),
    ("setup", "setup time p50, PFS", "ms", "lower",
     "conn1", "setup_ms_p50", "cc", "oo", None, "conn1"),
    ("setupf", "setup time p50, -f", "ms", "lower",
     "conn1f", "setup_ms_p50", "cc", "oo", None, "conn1"),
    ("echo_ref", "64 B echo p50, direct (ref)", "µs", "lower",
     "echo", "p50_us", "direct", None, None, None),
    ("echo_p50", "64 B echo round trip p50 ({b})", "µs", "lower",
     "echo", "p50_us", "cc", "oo", ("ratio", "<=", 1.5), "echo"),
    ("echo_p99", "64 B echo round trip p99 ({b})", "µs", "lower",
     "echo", "p99_us", "cc", "oo", None, "echo"),
    ("echo_cpu_e", "64 B echo, CPU per round trip -e ({b})", "µs", "lower",
     "echo", "cpu_e_us_per_rt", "cc", "oo", ("ratio", "<=", 1.5), "echo"),
    ("echo_cpu_d", "64 B echo, CPU per round trip -d ({b})", "µs", "lower",
     "echo", "cpu_d_us_per_rt", "cc", "oo", ("ratio", "<=", 1.5), "echo"),
    ("echo_p50_2", "64 B echo round trip p50 ({b2})", "µs", "lower",
     "echo", "p50_us", "cc", "o2", ("ratio", "<=", 1.5), "echo"),
    ("echo_cpu_e_2", "64 B echo, CPU per round trip -e ({b2})", "µs", "lower",
     "echo", "cpu_e_us_per_rt", "cc", "o2", ("ratio", "<=", 1.5), "echo"),
    ("echo_cpu_d_2", "64 B echo, CPU per round trip -d ({b2})", "µs", "lower",
     "echo", "cpu_d_us_per_rt", "cc", "o2", ("ratio", "<=", 1.5), "echo"),
    ("echo_fc_p50", "64 B echo p50, floor + our codecs (ref)", "µs", "lower",
     "echo", "p50_us", "fc", None, None, None),
    ("echo_fc_cpu_e", "64 B echo, CPU per rt -e, floor + our codecs (ref)", "µs", "lower",
     "echo", "cpu_e_us_per_rt", "fc", None, None, None),
    ("echo_fc_cpu_d", "64 B echo, CPU per rt -d, floor + our codecs (ref)", "µs", "lower",
     "echo", "cpu_d_us_per_rt", "fc", None, None, None),
    ("keys_cpu", "-d CPU per PFS conn, 3 keys (C col: 1 key)", "ms", "lower",
     "keys", "cpu_d_ms_per_conn", "key1", "key3", ("ratio", "<=", 1.10), None),
    ("multi_ref", "100 conns, echo all, direct (ref)", "s", "lower",
     "multi", "seconds", "direct", None, None, None),
    ("multi_open", "100 conns, open all (8 in flight)", "s", "lower",
     "multi", "open_s", "cc", "oo", None, "multi"),
    ("multi_time", "100 conns, echo all at once", "s", "lower",
     "multi", "seconds", "cc", "oo", ("ratio", "<=", 1.4), "multi"),
    ("multi_err", "100 conns, errors (sum)", "count", "lower",
     "multi", "errors", "cc", "oo", ("abs", "==", 0), "multi"),
    ("idle_e", "idle VmRSS -e (before 100 conns)", "MiB", "lower",
     "multi", "idle_rss_e_mib", "cc", "oo", None, "multi"),
    ("rss_e", "100 conns, peak VmRSS -e", "MiB", "lower",
     "multi", "rss_e_mib", "cc", "oo", ("over", "<=", 10), "multi"),
    ("rss_d", "100 conns, peak VmRSS -d", "MiB", "lower",
     "multi", "rss_d_mib", "cc", "oo", ("over", "<=", 10), "multi"),
    ("hwm_e", "100 conns, VmHWM -e at end", "MiB", "lower",
     "multi", "hwm_e_mib", "cc", "oo", None, "multi"),
    ("hwm_d", "100 conns, VmHWM -d at end", "MiB", "lower",
     "multi", "hwm_d_mib", "cc", "oo", None, "multi"),
    ("busy_time", "1,000 conns × 16 KiB, echo all at once", "s", "lower",
     "busy", "seconds", "cc", "oo", None, "busy"),
    ("busy_err", "1,000 conns × 16 KiB, errors (sum)", "count", "lower",
     "busy", "errors", "cc", "oo", ("abs", "==", 0), "busy"),
    ("busy_rss_e", "1,000 conns × 16 KiB, peak VmRSS -e", "MiB", "lower",
     "busy", "rss_e_mib", "cc", "oo", ("over", "<=", 10), "busy"),
    ("busy_rss_d", "1,000 conns × 16 KiB, peak VmRSS -d", "MiB", "lower",
     "busy", "rss_d_mib", "cc", "oo", ("over", "<=", 10), "busy"),
    ("unauth_cpu", "-d CPU per unauthenticated connect/close", "ms", "lower",
     "unauth", "cpu_d_ms_per_conn", "cc", "oo", ("floor", "<=", 1.2), "unauth"),
    ("held_open", "held conns, time to open all", "s", "lower",
     "held", "open_s", "cc", "oo", None, "held"),
    ("held_err", "held conns, errors (sum)", "count", "lower",
     "held", "errors", "cc", "oo", ("abs", "==", 0), "held"),
    ("held_hwm_e", "held conns, peak RSS -e (VmHWM)", "MiB", "lower",
     "held", "hwm_e_mib", "cc", "oo", ("abs", "<=", 80), "held"),
    ("held_hwm_d", "held conns, peak RSS -d (VmHWM)", "MiB", "lower",
     "held", "hwm_d_mib", "cc", "oo", ("abs", "<=", 80), "held"),
    ("held_thr_e", "held conns, peak threads -e", "count", "lower",
     "held", "threads_e", "cc", "oo", None, "held"),
    ("held_thr_d", "held conns, peak threads -d", "count", "lower",
     "held", "threads_d", "cc", "oo", None, "held"),
    ("burst_served", "500 connects at once to -d -n 0, served", "count", "higher",
     "burst", "served", "cc", "oo", ("abs", "==", 500), None),
    ("burst_time", "500 connects at once, until all served", "s", "lower",
     "burst", "all_s", "cc", "oo", None, None),
    ("spipe_inst", "spipe one request, installed ({b})", "ms", "lower",
     "spipe_inst", "ms", "c", "ours", ("floor", "<=", 1.25), "spipe_inst"),
    ("spipe_copy", "spipe one request, copied file ({b})", "ms", "lower",
     "spipe_copy", "ms", "c", "ours", ("floor", "<=", 1.25), "spipe_copy"),
    ("spipe_inst_2", "spipe one request, installed ({b2})", "ms", "lower",
     "spipe_inst", "ms", "c", "o2", ("floor", "<=", 1.25), ("spipe_inst", "f2")),
    ("spipe_copy_2", "spipe one request, copied file ({b2})", "ms", "lower",
     "spipe_copy", "ms", "c", "o2", ("floor", "<=", 1.25), ("spipe_copy", "f2")),
    ("held10k_open", "10,000 held, ours -e → C -d, time to open all", "s", "lower",
     "held10k", "open_s", "cc", "oc", None, ("held10k", "f1")),
    ("held10k_err", "10,000 held, ours -e → C -d, errors (sum)", "count", "lower",
     "held10k", "errors", "cc", "oc", ("abs", "==", 0), ("held10k", "f1")),
    ("held10k_hwm", "10,000 held, peak RSS of -e (VmHWM)", "MiB", "lower",
     "held10k", "hwm_e_mib", "cc", "oc", ("floor", "<=", 1.1), ("held10k", "f1")),
    ("held10k_thr", "10,000 held, peak threads of -e", "count", "lower",
     "held10k", "threads_e", "cc", "oc", None, ("held10k", "f1")),
]


HELD_TARGET_CONNS = 1000  # connections of the held phase unless told
HELD_TARGETS = {1000: 80, 5000: 250}   # held connections -> MiB per daemon at most
FLOOR = "ff"              # the variant of the floor relay pair (bench/floor.py)
FLOOR_CODEC = "fc"        # the floor pair sealing and opening with our codecs (--codec)
FLOOR_ONE = "f1"          # one floor relay alone in front of the target (10,000 held)


def backend_of(python):
    """The back end (cffi or ctypes) Cryptodome picks under the interpreter PYTHON."""
    try:
        r = subprocess.run([python, "-c", "from Cryptodome.Util import _raw_api;"
                            " print(_raw_api.backend)"], capture_output=True, timeout=60)
        return r.stdout.decode().strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def aggregate(runs, field):
    """(median of FIELD over RUNS, or the sum for error counts; failed samples)."""
    vals = [r[field] for r in runs if isinstance(r.get(field), (int, float))]
    failed = sum(1 for r in runs if "error" in r and field not in r)
    if field == "errors":
        # a sample that failed outright counts as an error as well
        vals = vals + [1] * failed
        return (sum(vals) if vals else None), failed
    return (statistics.median(vals) if vals else None), failed


def summarize(samples, held_conns=HELD_TARGET_CONNS, backend="?", backend2="?"):
    """Medians per row (sum for error counts) with ratios and PASS/FAIL.

    A row's floor is the FLOOR variant of its floor metric, or a (metric,
    variant) pair; "{b}" and "{b2}" in a label name the back ends of ours
    (--python) and of the second interpreter (--also-python).
    """
    rows = []
    for key, label, unit, better, metric, field, cv, ov, target, fm in ROWS:
        if metric not in samples or (ov is not None and ov not in samples[metric]):
            continue
        label = label.format(b=backend, b2=backend2)
        fm, fv = fm if isinstance(fm, tuple) else (fm, FLOOR)
        if key.startswith("held_hwm"):
            target = HELD_TARGETS.get(held_conns) and ("abs", "<=", HELD_TARGETS[held_conns])
        m = samples[metric]

        def agg(runs_of, var):
            if var is None or var not in runs_of:
                return None, 0
            return aggregate(runs_of[var], field)

        c, cfail = agg(m, cv)
        o, ofail = agg(m, ov)
        f, ffail = agg(samples.get(fm, {}), fv if fm else None)
        ratio = (o / c) if (c and o is not None) else None
        fratio = (o / f) if (f and o is not None) else None
        tgt, status = judge(target, o, ratio, fratio)
        rows.append({"key": key, "metric": label, "unit": unit, "better": better,
                     "c": c, "ours": o, "ratio": ratio,
                     "floor": f, "floor_ratio": fratio,
                     "target": tgt, "status": status, "c_variant": cv,
                     "ours_variant": ov, "floor_metric": fm,
                     "failed_samples": {"c": cfail, "ours": ofail, "floor": ffail}})
    return rows


SIGN = {">=": "≥", "<=": "≤", "==": "="}


def judge(target, ours, ratio, fratio):
    """(target text, "PASS"/"FAIL"/"n/a"/"") for a row's TARGET.

    A target is (kind, op, x) or a tuple of them, all to be met: kind "ratio"
    compares ours/C, "floor" ours/floor, "abs" ours itself, "over" ours minus
    the floor.
    """
    if not target:
        return "", ""
    targets = (target,) if isinstance(target[0], str) else target
    texts, results = [], []
    for kind, op, x in targets:
        over = ours - ours / fratio if ours is not None and fratio else None
        val = {"ratio": ratio, "floor": fratio, "abs": ours, "over": over}[kind]
        texts.append({"ratio": "%s %g× C", "floor": "%s %g× floor",
                      "abs": "ours %s %g", "over": "%s floor + %g"}[kind] % (SIGN[op], x))
        if val is None:
            results.append(None)
        else:
            results.append({">=": val >= x, "<=": val <= x, "==": val == x}[op])
    if False in results:
        status = "FAIL"
    elif None in results:
        status = "n/a"
    else:
        status = "PASS"
    return " & ".join(texts), status


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


def fmt_ratio(r):
    return ("%.2f×" % r) if r is not None else "—"


def render_table(rows, floor=True):
    """The table; FLOOR adds the floor and ours/floor columns."""
    head = ["metric", "unit", "C", "ours", "ours/C"]
    if floor:
        head += ["floor", "ours/floor"]
    head += ["better", "target", "result"]
    body = []
    for r in rows:
        fails = r["failed_samples"]
        if r["ours_variant"] is None:       # reference row
            cells = [fmt_num(r["c"]), "(ref)", ""]
        else:
            o_txt = fmt_num(r["ours"])
            if fails["c"] or fails["ours"]:
                o_txt += " (!%d/%d failed)" % (fails["c"], fails["ours"])
            cells = [fmt_num(r["c"]), o_txt, fmt_ratio(r["ratio"])]
        if floor:
            if r["floor_metric"] is None:
                cells += ["", ""]
            else:
                f_txt = fmt_num(r["floor"])
                if fails["floor"]:
                    f_txt += " (!%d failed)" % fails["floor"]
                cells += [f_txt, fmt_ratio(r["floor_ratio"])]
        body.append([r["metric"], r["unit"]] + cells
                    + [r["better"], r["target"], r["status"]])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    right = set(range(2, len(head) - 3))

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(b) for b in body]
    return "\n".join(out)


def machine_info(impls):
    """Machine, Python, Cryptodome and the versions of IMPLS (name -> command)."""
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
    for name in ("c", "ours"):
        cmd = impls[name]
        try:
            r = subprocess.run(cmd + ["-v"], capture_output=True, timeout=20)
            info["version_" + name] = (r.stderr + r.stdout).decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["version_" + name] = "unavailable: %s" % e
    for name, cmd in impls.items():
        info["cmd_" + name] = cmd
    return info


def write_json(doc, path=None):
    """Write DOC to PATH, or else to a new temporary file; return the path."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(path, "w")
    else:
        fd, path = tempfile.mkstemp(prefix="spiped-bench-", suffix=".json")
        f = os.fdopen(fd, "w")
    with f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return path
