"""--metrics: the Prometheus endpoint (GET /metrics, GET /healthz) of a running spiped.

C spiped -e is the client side and ours -d --metrics the server side, so
the counters are checked against what the test itself did.  promtool and a
real Prometheus (Debian package prometheus) read the output; without them
those tests skip, except under CI=true, where they fail.
"""
import json
import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

import spiped
from conftest import (connect, drain, exchange, free_port, need_c, ours, recv_all, recv_exact,
                      refused, tcp_addr, unavailable, wait_closed, wait_for, wait_listening,
                      wrapped)

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def need_binary(path):
    if not os.access(path, os.X_OK):
        unavailable("%s not installed (apt-get install prometheus)" % path)


def http_get(addr, path, accept=None, timeout=10.0):
    """(status, headers dict, body bytes) of GET PATH from spiped-style ADDR (TCP or unix)."""
    s = connect(addr, timeout=timeout)
    try:
        request = "GET %s HTTP/1.0\r\nHost: spiped\r\n" % path
        if accept:
            request += "Accept: %s\r\n" % accept
        s.sendall((request + "\r\n").encode())
        data = recv_all(s)
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(addr):
    """{(name, ((label, value), ...)): value} of the /metrics text format."""
    status, headers, body = http_get(addr, "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        name, labels, value = SAMPLE.match(line).groups()
        out[name, tuple(LABEL.findall(labels or ""))] = float(value)
    return out


def metric(addr, name, tunnel=None, **labels):
    """One sample's value (None if absent)."""
    key = ((("tunnel", tunnel),) if tunnel else ()) + tuple(labels.items())
    return samples(addr).get((name, key))


def chain(procs, keyfile, echo, metrics, impl="ours"):
    """C spiped -e -> IMPL -d --metrics METRICS -> echo; (entry address, -d's address, our -d)."""
    e, d = procs.chain(echo().addr, keyfile, "c", impl, d_extra=("--metrics", metrics))
    wait_listening(metrics, d)
    return e.addr, d.addr, d


def c_front(procs, keyfile, to):
    """C spiped -e with KEYFILE in front of TO; its address."""
    return procs.spiped("-e", to, keyfile, impl="c").addr


def threads_of(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def settled_threads(pid):
    """PID's thread count once two readings 0.2 s apart agree (within 5 s)."""
    seen = [threads_of(pid)]

    def same():
        seen.append(threads_of(pid))
        return len(seen) > 2 and seen[-1] == seen[-2]  # the first call comes at once
    wait_for(same, timeout=5, step=0.2)
    return seen[-1]


# -- the format -----------------------------------------------------------------


def test_render_escapes_label_values_and_ends_openmetrics():
    tunnel = {"live": 1, "total": 2, "bytes_in": 3, "bytes_out": 4, "connect_failures": 0,
              "limit_reached": 0, "refused": 0, "handshake_failures": {"bad-mac": 1},
              "keys": {'a"b\\c\nd': 2}, "listening": True}
    snap = {"tunnels": {"/tmp/x": tunnel}, "reloads": 1, "reload_failures": 0,
            "draining": False, "started": 1.5}
    text = spiped.render_metrics(snap)
    assert 'spiped_key_handshakes_total{tunnel="/tmp/x",key="a\\"b\\\\c\\nd"} 2\n' in text
    assert "# TYPE spiped_connections_total counter\n" in text
    assert "spiped_process_start_time_seconds 1.5\n" in text
    assert not text.rstrip().endswith("# EOF")
    om = spiped.render_metrics(snap, openmetrics=True)
    assert om.endswith("\n# EOF\n")
    assert "# TYPE spiped_connections counter\n" in om and "spiped_connections_total{" in om
    assert spiped.health(snap) == (200, "ok\n")
    assert spiped.health(dict(snap, draining=True))[0] == 503
    down = dict(snap, tunnels={"/tmp/x": dict(tunnel, listening=False)})
    assert spiped.health(down)[0] == 503


SNAPSHOT = {"tunnels": {"[127.0.0.1]:1": {
    "live": 0, "total": 3, "bytes_in": 0, "bytes_out": 0, "connect_failures": 0,
    "limit_reached": 0, "refused": 0, "handshake_failures": {}, "keys": {}, "listening": True}},
    "reloads": 0, "reload_failures": 0, "draining": False, "started": 1.5}
DATE = re.compile(rb"\r\nDate: ([^\r]*)\r\n")


def answer(head, snapshot=SNAPSHOT):
    """spiped's response to HEAD, its Date header's value replaced by "D"."""
    return DATE.sub(b"\r\nDate: D\r\n", spiped.metrics_response(head, lambda: snapshot))


def test_responses_byte_for_byte():
    common = b"HTTP/1.0 %s\r\nServer: spiped/" + spiped.__version__.encode() + b"\r\nDate: D\r\n"
    text = spiped.render_metrics(SNAPSHOT).encode()
    assert answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == (
        common % b"200 OK" + b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        b"Content-Length: %d\r\n\r\n" % len(text) + text)
    om = spiped.render_metrics(SNAPSHOT, openmetrics=True).encode()
    for accept in (b"accept: application/openmetrics-text",
                   b"Accept: application/openmetrics-text; version=1.0.0,text/plain;q=0.5"):
        assert answer(b"GET /metrics?x=1 HTTP/1.0\n" + accept + b"\n\n") == (
            common % b"200 OK" + b"Content-Type: application/openmetrics-text; version=1.0.0;"
            b" charset=utf-8\r\nContent-Length: %d\r\n\r\n" % len(om) + om)
    first_wins = b"GET /metrics HTTP/1.0\r\nAccept: text/plain\r\nAccept: application/openmetrics-text\r\n\r\n"
    assert answer(first_wins).endswith(text)
    plain = b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
    assert answer(b"GET /healthz HTTP/1.0\r\n\r\n") == common % b"200 OK" + plain % (3, b"ok\n")
    assert answer(b"GET /healthz HTTP/1.0\r\n\r\n", dict(SNAPSHOT, draining=True)) == (
        common % b"503 Service Unavailable" + plain % (9, b"draining\n"))
    for path in (b"/", b"/metrics/", b"http://h/metrics", b"/nothing"):
        assert answer(b"GET %s HTTP/1.0\r\n\r\n" % path) == (
            common % b"404 Not Found" + plain % (10, b"not found\n"))
    for method in (b"POST", b"HEAD", b"get"):
        assert answer(b"%s /metrics HTTP/1.0\r\n\r\n" % method) == (
            common % b"501 Not Implemented" + plain % (16, b"not implemented\n"))
    bad = common % b"400 Bad Request" + plain % (12, b"bad request\n")
    for head in (b"garbage\r\n\r\n", b"\r\n\r\n", b"GET /metrics\r\n\r\n",
                 b"GET /metrics HTTP/2.0\r\n\r\n", b"GET  /metrics HTTP/1.0\r\n\r\n",
                 b"GET /met rics HTTP/1.0\r\n\r\n", b"GET /m\x00 HTTP/1.0\r\n\r\n",
                 b"GET /metrics HTTP/1.0\r\nno colon\r\n\r\n",
                 b"GET /metrics HTTP/1.0\r\nAccept : x\r\n\r\n",
                 b"GET /metrics HTTP/1.0\r\nA: b\r\n folded\r\n\r\n",
                 b"GET /metrics HTTP/1.0\r\nA: b\x01\r\n\r\n",
                 b"GET /metrics HTTP/1.0\r\nA: b\rc\r\n\r\n", None):
        assert answer(head) == bad, head


def test_date_header_is_the_http_date_in_english():
    import email.utils  # what http.server wrote
    for when in (0, 951782400.5, 1700000000, 4102444799):
        assert spiped.http_date(when) == email.utils.formatdate(when, usegmt=True)


# -- promtool and Prometheus ----------------------------------------------------


@need_c
def test_promtool_accepts_the_output(procs, keyfile, echo):
    need_binary(PROMTOOL)
    metrics = tcp_addr(free_port())
    entry, middle, _ = chain(procs, keyfile, echo, metrics)
    assert exchange(entry, b"x" * 5000) == b"x" * 5000
    assert wait_for(lambda: metric(metrics, "spiped_connections_live", tunnel=middle) == 0)
    status, headers, body = http_get(metrics, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b'direction="in"' in body and b'reason="bad-mac"' in body
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check
    assert check.stdout.strip() == b"" and check.stderr.strip() == b"", check
    status, headers, body = http_get(metrics, "/metrics", accept="application/openmetrics-text")
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"\n# EOF\n")


def _prometheus_value(port, query):
    url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (port, query)
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            result = json.load(answer)["data"]["result"]
    except (OSError, ValueError, KeyError):
        return None
    return [float(r["value"][1]) for r in result]


@need_c
def test_prometheus_scrapes_the_connection_count(procs, keyfile, echo, tmp_path):
    need_binary(PROMETHEUS)
    port = free_port()
    metrics = tcp_addr(port)
    entry, _, _ = chain(procs, keyfile, echo, metrics)
    for payload in (b"a" * 10, b"b" * 3000):
        assert exchange(entry, payload) == payload
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                      "scrape_configs:\n  - job_name: spiped\n    static_configs:\n"
                      "      - targets: ['127.0.0.1:%d']\n" % port)
    web = free_port()
    prom = procs.daemon([PROMETHEUS, "--config.file=%s" % config,
                         "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
                         "--web.listen-address=127.0.0.1:%d" % web], cwd=str(tmp_path),
                        name="prometheus")
    try:
        seen = wait_for(lambda: _prometheus_value(web, "spiped_connections_total") == [2.0]
                        or prom.poll() is not None, timeout=30, step=0.5)
        assert prom.poll() is None, prom.log_text()[-3000:]
        assert seen, (_prometheus_value(web, "spiped_connections_total"),
                      prom.log_text()[-3000:])
        assert _prometheus_value(web, 'spiped_bytes_total{direction="in"}') == [3010.0]
        assert _prometheus_value(web, 'up{job="spiped"}') == [1.0]
    finally:
        prom.send_signal(signal.SIGKILL)
        prom.wait(timeout=10)


# -- the counters against what the test did ----------------------------------------


@need_c
def test_counters_move_by_exactly_what_was_done(procs, keyfile, otherkey, echo, tmp_path):
    good_target = echo()
    good, refused = tcp_addr(free_port()), tcp_addr(free_port())
    conf = tmp_path / "tunnels.conf"
    conf.write_text("-d -s %s -t %s -k %s\n-d -s %s -t %s -k %s\n"
                    % (good, good_target.addr, keyfile, refused, tcp_addr(free_port()), keyfile))
    metrics = tcp_addr(free_port())
    p = procs.daemon(ours("--config", str(conf), "-F", "--metrics", metrics), good, refused,
                     metrics)
    entry, wrong, dead = (c_front(procs, keyfile, good), c_front(procs, otherkey, good),
                          c_front(procs, keyfile, refused))
    payloads = [b"1" * 1, b"2" * 1024, b"3" * 70001]
    for payload in payloads:
        assert exchange(entry, payload) == payload
    held = connect(entry)
    held.sendall(b"h" * 1234)
    assert recv_exact(held, 1234) == b"h" * 1234
    sent = sum(map(len, payloads)) + 1234
    value = lambda name, **kw: metric(metrics, name, tunnel=good, **kw)
    assert wait_for(lambda: value("spiped_bytes_total", direction="out") == sent)
    assert value("spiped_bytes_total", direction="in") == sent  # a live connection's too
    assert value("spiped_connections_live") == 1
    assert value("spiped_connections_total") == 4
    held.close()
    assert wait_for(lambda: value("spiped_connections_live") == 0)
    assert value("spiped_bytes_total", direction="in") == sent
    assert value("spiped_bytes_total", direction="out") == sent
    assert value("spiped_key_handshakes_total", key=os.path.basename(keyfile)) == 4

    assert exchange(wrong, b"nope", timeout=10) == b""
    assert wait_for(lambda: value("spiped_handshake_failures_total", reason="bad-mac") == 1)
    assert value("spiped_connections_total") == 5
    assert value("spiped_connect_failures_total") == 0

    assert exchange(dead, b"nobody there", timeout=10) == b""
    assert wait_for(lambda: metric(metrics, "spiped_connect_failures_total", tunnel=refused) == 1)
    assert metric(metrics, "spiped_connections_total", tunnel=refused) == 1
    assert metric(metrics, "spiped_bytes_total", tunnel=refused, direction="in") == 0
    assert value("spiped_connect_failures_total") == 0
    assert metric(metrics, "spiped_tunnels") == 2
    assert metric(metrics, "spiped_reloads_total") == 0
    p.send_signal(signal.SIGHUP)
    assert wait_for(lambda: metric(metrics, "spiped_reloads_total") == 1)
    conf.write_text("this is not a tunnel\n")
    p.send_signal(signal.SIGHUP)
    assert wait_for(lambda: metric(metrics, "spiped_reload_failures_total") == 1)
    assert metric(metrics, "spiped_reloads_total") == 2
    started = metric(metrics, "spiped_process_start_time_seconds")
    assert time.time() - 120 < started <= time.time()


# -- /healthz and the drain --------------------------------------------------------


@need_c
def test_healthz_is_503_while_draining(procs, keyfile, echo):
    metrics = tcp_addr(free_port())
    entry, middle, p = chain(procs, keyfile, echo, metrics)
    assert http_get(metrics, "/healthz")[0:3:2] == (200, b"ok\n")
    assert http_get(metrics, "/nothing")[0] == 404
    held = connect(entry)
    held.sendall(b"still here")
    assert recv_exact(held, 10) == b"still here"
    p.send_signal(signal.SIGTERM)
    assert wait_for(lambda: http_get(metrics, "/healthz")[0] == 503)
    assert http_get(metrics, "/healthz")[2] == b"draining\n"
    assert metric(metrics, "spiped_draining") == 1
    assert wait_for(lambda: refused(middle), step=0.1)  # a new client goes elsewhere at once
    held.sendall(b"x")
    assert recv_exact(held, 1) == b"x"  # the drain still serves it
    assert http_get(metrics, "/healthz")[0:3:2] == (503, b"draining\n")  # until the exit
    held.close()
    assert p.wait(timeout=20) == 0


# -- a hostile scraper -----------------------------------------------------------


@need_c
def test_a_scrape_is_answered_while_silent_sockets_are_open(procs, keyfile, echo, tmp_path):
    """20 sockets that say nothing keep no scraper waiting and take no thread;
    each is still cut at its deadline."""
    impl = wrapped(tmp_path, "spiped.METRICS_TIMEOUT = 4.0")
    metrics = str(tmp_path / "metrics.sock")
    entry, _, p = chain(procs, keyfile, echo, metrics, impl)
    assert http_get(metrics, "/healthz")[0] == 200
    baseline = settled_threads(p.pid)
    silent = [connect(metrics) for _ in range(20)]
    assert http_get(metrics, "/healthz")[0:3:2] == (200, b"ok\n")
    assert select.select(silent, [], [], 0)[0] == []  # answered while they are all open
    assert threads_of(p.pid) <= baseline
    payload = os.urandom(20000)
    assert exchange(entry, payload, timeout=10) == payload  # the tunnel serves meanwhile
    for sock in silent:
        assert wait_closed(sock, 10) is not None  # cut at its deadline
        sock.close()
    assert threads_of(p.pid) <= baseline
    assert http_get(metrics, "/healthz")[0] == 200
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert not os.path.exists(metrics)  # the socket file went with the process


@need_c
def test_200_silent_sockets_keep_one_thread_and_no_scraper_out(procs, keyfile, echo):
    """Beyond METRICS_SOCKETS the oldest silent socket makes room for a newcomer:
    one thread, a bounded number of descriptors, and a scrape is answered."""
    metrics = tcp_addr(free_port())
    entry, middle, p = chain(procs, keyfile, echo, metrics)
    assert http_get(metrics, "/healthz")[0] == 200
    threads, fds = settled_threads(p.pid), len(os.listdir("/proc/%d/fd" % p.pid))
    silent = []
    try:
        for _ in range(200):
            silent.append(connect(metrics))
        assert http_get(metrics, "/metrics")[0] == 200
        assert metric(metrics, "spiped_connections_total", tunnel=middle) == 0
        assert threads_of(p.pid) <= threads
        assert len(os.listdir("/proc/%d/fd" % p.pid)) <= fds + spiped.METRICS_SOCKETS
        ended = select.poll()  # a socket the daemon closed reads as ready (EOF)
        for sock in silent:
            ended.register(sock, select.POLLIN)
        assert wait_for(lambda: len(ended.poll(0)) >= 200 - spiped.METRICS_SOCKETS)
        payload = os.urandom(20000)
        assert exchange(entry, payload, timeout=10) == payload  # the tunnel serves meanwhile
    finally:
        for sock in silent:
            sock.close()
    assert http_get(metrics, "/healthz")[0] == 200


def _trickle_until_cut(sock, data, every, limit):
    """Send DATA a byte at a time, EVERY seconds; seconds until the server cut SOCK, or None."""
    started = time.monotonic()
    for byte in data[:int(limit / every)]:
        try:
            sock.send(bytes([byte]))
        except OSError:
            return time.monotonic() - started
        if select.select([sock], [], [], every)[0]:
            try:
                if not sock.recv(4096):
                    return time.monotonic() - started
            except OSError:
                return time.monotonic() - started
    return None


@need_c
def test_a_trickling_scraper_is_cut_at_the_deadline(procs, keyfile, echo, tmp_path):
    """Each byte comes well within the socket timeout; the whole request still ends."""
    impl = wrapped(tmp_path, "spiped.METRICS_TIMEOUT = 2.0")
    metrics = tcp_addr(free_port())
    entry, _, p = chain(procs, keyfile, echo, metrics, impl)
    sock = connect(metrics)
    try:
        cut = _trickle_until_cut(sock, b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 100,
                                 every=0.2, limit=10)
    finally:
        sock.close()
    assert cut is not None and 1.5 < cut < 4.0, cut
    assert exchange(entry, b"still serving", timeout=10) == b"still serving"
    assert http_get(metrics, "/healthz")[0] == 200


def test_a_head_longer_than_the_limit_gets_400(procs, keyfile, tmp_path):
    metrics = tcp_addr(free_port())
    source = str(tmp_path / "source.sock")
    p = procs.spiped("-d", "[127.0.0.1]:1", keyfile, "--metrics", metrics, source=source)
    wait_listening(metrics, p)
    line = b"GET /healthz HTTP/1.0\r\nX-Long: "
    fits = line + b"a" * (spiped.METRICS_HEAD_MAX - len(line) - 4) + b"\r\n\r\n"
    for head, status in ((fits, b"200 OK"), (b"a" + fits, b"400 Bad Request"),
                         (line + b"a" * spiped.METRICS_HEAD_MAX, b"400 Bad Request")):
        with connect(metrics) as s:
            s.sendall(head)
            got, how = drain(s)
        assert got.startswith(b"HTTP/1.0 %s\r\n" % status), (len(head), got[:100], how)
    assert http_get(metrics, "/healthz")[0] == 200


# -- the option --------------------------------------------------------------------


def test_bad_metrics_address_exits_1(procs, keyfile, tmp_path):
    source = str(tmp_path / "source.sock")
    base = ["-d", "-F", "-s", source, "-t", "[127.0.0.1]:1", "-k", keyfile]
    p = procs.start(ours(*base, "--metrics", "no-port-here"))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert b"Address must contain port number: no-port-here" in err
    p = procs.start(ours(*base, "--metrics", ""))
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and b"Empty socket address" in err and b"usage: spiped" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = tcp_addr(busy.getsockname()[1])
        pidfile = tmp_path / "d.pid"
        p = procs.start(ours(*base[:1], *base[2:], "-p", str(pidfile), "--metrics", taken))
        _, err = p.communicate(timeout=30)  # not -F: fails before daemonizing
    assert p.returncode == 1
    assert b"Error binding --metrics socket %s: Address already in use" % taken.encode() in err
    assert not pidfile.exists()
    assert not os.path.exists(source)  # the tunnel bound first, and let go of its file


def test_metrics_on_a_tunnel_line_is_an_error(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("-e -s [127.0.0.1]:1 -t [127.0.0.1]:2 -k %s --metrics [127.0.0.1]:3\n"
                    % keyfile)
    with pytest.raises(spiped.SpipedError) as e:
        spiped.parse_config_file(str(conf))
    assert e.value.lines[0] == ("%s:1: --metrics belongs on the command line, not on a"
                                " tunnel line" % conf)
    options = spiped.parse_spiped_args(["--config", str(conf), "--metrics", "/tmp/m.sock"])
    assert options.metrics == "/tmp/m.sock" and options.tunnel is None


def test_metrics_with_config_on_a_unix_socket(procs, keyfile, tmp_path):
    sources = [tcp_addr(free_port()), str(tmp_path / "s2.sock")]
    conf = tmp_path / "c.conf"
    conf.write_text("".join("-e -s %s -t [127.0.0.1]:1 -k %s\n" % (s, keyfile)
                            for s in sources))
    metrics = str(tmp_path / "m.sock")
    p = procs.daemon(ours("--config", str(conf), "-F", "--metrics", metrics), *sources, metrics)
    found = samples(metrics)
    for source in sources:
        assert found["spiped_connections_total", (("tunnel", source),)] == 0
    assert http_get(metrics, "/healthz")[0] == 200
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 0
    assert not os.path.exists(metrics)
