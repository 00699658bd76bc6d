"""contrib/ for real: the image under podman (alone, with podman-compose
from contrib/docker/compose.yaml, and in the contrib/kubernetes/ manifests
under podman kube play), the systemd units under a booted systemd, the
OpenRC service under openrc-init.

Each part runs in a Debian 12 made with `debootstrap --variant=minbase
bookworm` from the host's own Debian mirror: the image is built FROM a
`debian:bookworm-slim` stand-in imported from such a tree, and systemd and
openrc-init boot as PID 1 of such trees with `systemd-nspawn` (sharing the
host's network namespace, so every tunnel runs over 127.0.0.1).  Each tree
and the image are built once per run and shared; everything lives in
/var/tmp/spiped-it-PID, removed at the end (SPIPED_IT_CACHE=DIR keeps the
trees in DIR and reuses them, for development).

Needs root, podman, debootstrap and systemd-nspawn (tests/setup-integration.sh
installs them), and a host where they can start containers: each engine is
first tried once on a tiny tree (probe()), so in a chroot without nested
mounts, say, its tests skip with the engine's error.  Without them the tests
skip, saying why; with CI=true or SPIPED_REQUIRE_INTEGRATION=1 a missing
prerequisite fails instead.

Network: only loopback.  Containers either share the host's network or are
reached through a port published on 127.0.0.1 whose target lies inside the
container's own network namespace; no test addresses a bridge IP (the
compose project's two containers find each other by name on the project's
own network, as compose makes them).
"""
import glob
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from conftest import (ROOT, EchoServer, SecretFolder, address_listening, assert_stays,
                      check_echo, exchange, free_port, ours, tcp_addr, unavailable, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

BASE_IMAGE = "docker.io/library/debian:bookworm-slim"   # what the Dockerfile's FROM asks for
STANDIN_LABEL = "spiped.test.standin"
TAG = "localhost/spiped-it:%d" % os.getpid()
PROJECT_FILES = ("spiped.py", "keygen.py", "contrib")


# ---------------------------------------------------------------- helpers

def inside_nspawn():
    """True inside a systemd-nspawn container (tests/fresh-machine.sh runs the
    suite in one), where booting further containers is not set up."""
    if os.environ.get("container") == "systemd-nspawn":
        return True
    try:
        with open("/run/host/container-manager") as f:
            return f.read().strip() == "systemd-nspawn"
    except OSError:
        return False


def need(*tools):
    if os.geteuid() != 0:
        unavailable("the integration tests need root")
    if inside_nspawn():
        unavailable("running inside a systemd-nspawn container: no nested containers")
    for tool in tools:
        if shutil.which(tool) is None:
            unavailable("%s is not installed (bash tests/setup-integration.sh)" % tool)


def probe(engine, cmd, timeout=120):
    """Run CMD, a trivial container start with ENGINE; if it fails, ENGINE cannot
    run containers here: unavailable(), with the first line of its error."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        unavailable("%s cannot start a container here: `%s` took over %d s" % (engine, " ".join(cmd), timeout))
    if p.returncode != 0:
        lines = (p.stderr.strip() or p.stdout.strip() or "exit %d" % p.returncode).splitlines()
        unavailable("%s cannot start a container here: %s" % (engine, lines[0].strip()))


def run(cmd, timeout=120, check=True, **kw):
    """Run CMD; with CHECK, fail showing its output unless it exits 0."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert p.returncode == 0, "%s exited %d:\n%s%s" % (
            " ".join(cmd), p.returncode, p.stdout[-3000:], p.stderr[-3000:])
    return p


def wait_until(condition, timeout, what):
    """CONDITION's value once it is true; fail after TIMEOUT seconds, saying WHAT."""
    value = wait_for(condition, timeout, step=0.2)
    assert value, "%s: not within %.0f s" % (what, timeout)
    return value


def echoes(addr, size=200000):
    """SIZE random bytes come back whole through ADDR (the echo behind the tunnel)."""
    check_echo(addr, os.urandom(size))


def free_low_port():
    """A free TCP port below 1024 on 127.0.0.1."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.fail("no free port below 1024")


def host_mirror():
    """The host's Debian mirror, from its apt sources (not the security one)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for line in open(path):
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    if os.path.exists("/etc/apt/sources.list"):
        for line in open("/etc/apt/sources.list"):
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    unavailable("no Debian mirror in the host's apt sources")


def readme_steps(path, heading, replace):
    """The shell lines of the ```sh blocks under HEADING in README PATH, each
    line whose first word is a key of REPLACE (an editor) replaced by its value."""
    with open(path) as f:
        text = f.read()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    section = text[start:] if end < 0 else text[start:end]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.strip()
            word = line.split(" ", 1)[0]
            lines.append(replace.get(word, line))
    assert lines, "no ```sh steps under %s in %s" % (heading, path)
    return "\n".join(lines) + "\n"


def spiped_host_pids(mode, source):
    """Host PIDs of spiped processes started as `spiped MODE -s SOURCE ...`."""
    want = [mode.encode(), b"-s", source.encode()]
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(d + "/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"spiped") for a in argv[:2]) and want in (argv[1:4], argv[2:5]):
            pids.append(int(d[6:]))
    return pids


class Conn:
    """One connection held open through a tunnel, echoing line by line."""

    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=20)

    def ping(self, n):
        msg = b"ping %d\n" % n
        self.sock.sendall(msg)
        got = b""
        while len(got) < len(msg):
            d = self.sock.recv(100)
            assert d, "the tunnel closed the connection"
            got += d
        assert got == msg

    def finish(self):
        """Half-close; the tunnel must pass the EOF back."""
        self.sock.shutdown(socket.SHUT_WR)
        assert self.sock.recv(100) == b""
        self.sock.close()


# ---------------------------------------------------------------- shared trees

@pytest.fixture(scope="session")
def workdir():
    need()
    cache = os.environ.get("SPIPED_IT_CACHE")
    if cache:
        os.makedirs(cache, exist_ok=True)
        yield cache
        return
    path = "/var/tmp/spiped-it-%d" % os.getpid()
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def probe_tree(workdir):
    """A tiny tree for probe(): empty but for the host's /usr, bound in read-only
    (a merged-/usr host's /bin, /lib and /lib64 are links into it).  Returns the
    tree and a tarball of it."""
    root = os.path.join(workdir, "probe")
    shutil.rmtree(root, ignore_errors=True)
    tree = os.path.join(root, "tree")
    for d in ("usr", "etc", "dev", "proc", "sys", "run", "tmp", "var/tmp"):
        os.makedirs(os.path.join(tree, d))
    for link in ("bin", "sbin", "lib", "lib64"):
        os.symlink("usr/" + link, os.path.join(tree, link))
    open(os.path.join(tree, "etc/os-release"), "w").close()
    tarball = os.path.join(root, "tree.tar")
    with tarfile.open(tarball, "w") as tar:
        tar.add(tree, arcname=".")
    return tree, tarball


@pytest.fixture(scope="session")
def podman_works(probe_tree):
    """podman can import an image and start a container from it."""
    need("podman")
    info = run(["podman", "info"], check=False, timeout=60)
    if info.returncode != 0:
        unavailable("podman cannot run here: %s" % (info.stderr.strip().splitlines() or ["?"])[-1])
    tag = "localhost/spiped-it-probe:%d" % os.getpid()
    try:
        probe("podman", ["podman", "import", probe_tree[1], tag], timeout=300)
        probe("podman", ["podman", "run", "--rm", "--network", "none", "-v", "/usr:/usr:ro",
                         tag, "/usr/bin/true"], timeout=300)
    finally:
        run(["podman", "rmi", "-f", tag], check=False, timeout=120)


@pytest.fixture(scope="session")
def nspawn_works(probe_tree):
    """systemd-nspawn can start a container (with --register=no --keep-unit, as Booted)."""
    need("systemd-nspawn", "nsenter")
    probe("systemd-nspawn", ["systemd-nspawn", "-q", "-D", probe_tree[0], "--register=no", "--keep-unit",
                             "--console=pipe", "--bind-ro=/usr", "/usr/bin/true"])


@pytest.fixture(scope="session")
def slim_rootfs(workdir):
    """debootstrap --variant=minbase bookworm, with the host's apt sources."""
    need("debootstrap")
    root = os.path.join(workdir, "rootfs-slim")
    if os.path.exists(root + ".done"):
        return root
    shutil.rmtree(root, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", "bookworm", root, host_mirror()], timeout=1200)
    os.remove(os.path.join(root, "etc/apt/sources.list"))
    if os.path.exists("/etc/apt/sources.list.d/debian.sources"):
        shutil.copy("/etc/apt/sources.list.d/debian.sources", os.path.join(root, "etc/apt/sources.list.d/"))
    else:
        shutil.copy("/etc/apt/sources.list", os.path.join(root, "etc/apt/sources.list"))
    for junk in glob.glob(root + "/var/cache/apt/archives/*.deb") + glob.glob(root + "/var/lib/apt/lists/*"):
        if os.path.isfile(junk):
            os.remove(junk)
    open(root + ".done", "w").close()
    return root


def derived_rootfs(slim, name, packages):
    """A copy of the slim tree with PACKAGES installed, and the project in /root/spiped."""
    root = os.path.join(os.path.dirname(slim), name)
    if not os.path.exists(root + ".done"):
        shutil.rmtree(root, ignore_errors=True)
        run(["cp", "-a", slim, root])
        shutil.copy("/etc/resolv.conf", os.path.join(root, "etc/resolv.conf"))
        run(["chroot", root, "sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
             "apt-get install -y -qq --no-install-recommends " + " ".join(packages)], timeout=1200)
        with open(os.path.join(root, "etc/hostname"), "w") as f:
            f.write(name + "\n")
        open(root + ".done", "w").close()
    project = os.path.join(root, "root/spiped")
    shutil.rmtree(project, ignore_errors=True)
    os.makedirs(project)
    for name in PROJECT_FILES:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(project, name))
        else:
            shutil.copy2(src, project)
    return root


@pytest.fixture(scope="session")
def echo_target():
    """A TCP echo server on 127.0.0.1 of the host, shared by the tunnels."""
    server = EchoServer()
    yield server
    server.close()


class Booted:
    """A container booted with systemd-nspawn on the host's network.

    .pid is the host PID of the container's PID 1; .sh() runs a shell
    command inside it; .path() is a path inside it as the host sees it.
    """

    def __init__(self, root, init_args, init_name, log):
        self.root = root
        self.log = log
        with open(log, "w") as out:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", root, "--register=no", "--keep-unit",
                 "--console=passive", *init_args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.pid = wait_until(lambda: self._child(init_name), 60, "%s as PID 1 in %s" % (init_name, root))

    def _child(self, name):
        assert self.nspawn.poll() is None, "systemd-nspawn exited: %s" % open(self.log).read()[-2000:]
        for d in glob.glob("/proc/[0-9]*"):
            try:
                with open(d + "/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(d + "/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if int(fields[1]) == self.nspawn.pid and comm == name:
                return int(d[6:])
        return None

    def sh(self, script, check=True, timeout=120):
        return run(["nsenter", "-t", str(self.pid), "-a", "sh", "-c", script],
                   check=check, timeout=timeout)

    def popen(self, script):
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-a", "sh", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def path(self, inside):
        return "/proc/%d/root%s" % (self.pid, inside)

    def stop(self, poweroff=None):
        """POWEROFF inside (if given), else SIGTERM to nspawn; wait; SIGKILL as a last resort."""
        if self.nspawn.poll() is None:
            if poweroff:
                self.sh(poweroff, check=False, timeout=30)
            else:
                self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.nspawn.send_signal(signal.SIGTERM)
                try:
                    self.nspawn.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.nspawn.kill()
                    self.nspawn.wait(timeout=30)


# ---------------------------------------------------------------- image

@pytest.fixture(scope="session")
def image(podman_works, slim_rootfs, workdir):
    """The image built from contrib/docker/Dockerfile on a slim stand-in."""
    imported = False
    exists = run(["podman", "image", "exists", BASE_IMAGE], check=False).returncode == 0
    if exists and not os.environ.get("SPIPED_IT_CACHE"):
        label = run(["podman", "image", "inspect", "--format",
                     "{{index .Labels \"%s\"}}" % STANDIN_LABEL, BASE_IMAGE]).stdout.strip()
        if label == "1":                          # an earlier run's stand-in: start fresh
            run(["podman", "rmi", "-f", BASE_IMAGE])
            exists = False
    if not exists:
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", slim_rootfs, "-c", "."],
                               stdout=subprocess.PIPE)
        run(["podman", "import", "--change", "CMD [\"bash\"]", "--change",
             "LABEL %s=1" % STANDIN_LABEL, "-", BASE_IMAGE], stdin=tar.stdout, timeout=600)
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0
        imported = True
    # --format docker keeps HEALTHCHECK; the build's apt-get uses the host's network.
    build = run(["podman", "build", "--format", "docker", "--network", "host",
                 "-f", os.path.join(ROOT, "contrib/docker/Dockerfile"), "-t", TAG, ROOT],
                check=False, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    yield TAG
    run(["podman", "rmi", "-f", TAG], check=False)
    if imported and not os.environ.get("SPIPED_IT_CACHE"):
        run(["podman", "rmi", "-f", BASE_IMAGE], check=False)


@pytest.fixture
def containers():
    """Names for containers; all are removed (rm -f -v: the image's VOLUME /spiped
    makes an anonymous volume) at the end of the test, the last named first
    (podman refuses to remove a container whose network another still
    shares), and one left behind fails the test."""
    names = []

    def name(what):
        names.append("spiped-it-%d-%s-%s" % (os.getpid(), what, uuid.uuid4().hex[:6]))
        return names[-1]

    yield name
    for n in reversed(names):
        run(["podman", "rm", "-f", "-v", "-t", "0", n], check=False)
    listed = run(["podman", "ps", "-a", "--format", "{{.Names}}"], check=False).stdout.split()
    left = [n for n in names if n in listed]
    assert not left, "containers left behind: %s" % left


def podman_key(image, workdir):
    keydir = os.path.join(workdir, "image-key-%s" % uuid.uuid4().hex[:6])
    os.mkdir(keydir)
    run(["podman", "run", "--rm", "--network", "none", "-v", "%s:/spiped/key" % keydir,
         image, "spiped-generate-key.sh"])
    return keydir


def wait_healthy(name):
    """Until `podman healthcheck run` says the container is healthy."""
    wait_until(lambda: run(["podman", "healthcheck", "run", name], check=False).returncode == 0,
               60, "%s healthy" % name)


def stop_quickly(name):
    started = time.monotonic()
    run(["podman", "stop", "-t", "20", name], timeout=60)
    took = time.monotonic() - started
    assert took < 10, "podman stop took %.1f s: SIGTERM was not handled by spiped as PID 1" % took
    assert run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip() == "0"


def test_image_key_generation(image, workdir):
    keydir = podman_key(image, workdir)
    key = os.path.join(keydir, "spiped-keyfile")
    st = os.stat(key)
    uid = run(["podman", "run", "--rm", "--network", "none", image, "id", "-u", "spiped"]).stdout.strip()
    assert st.st_size == 32
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == int(uid) and st.st_uid != 0
    version = run(["podman", "run", "--rm", "--network", "none", image, "spiped", "-v"]).stderr
    assert any(l.startswith("spiped ") for l in version.splitlines()), version


def test_image_has_the_man_pages(image):
    listed = run(["podman", "run", "--rm", "--network", "none", image,
                  "ls", "/usr/local/share/man/man1"]).stdout.split()
    assert sorted(listed) == ["spipe.1", "spiped.1"], listed


def test_image_tunnel_on_host_network(image, workdir, containers, echo_target):
    """-d and -e containers on the host's network; health check; stop exits 0."""
    keydir = podman_key(image, workdir)
    health = run(["podman", "image", "inspect", "--format", "{{json .Config.Healthcheck}}", image]).stdout
    assert "spiped-healthcheck" in health, "HEALTHCHECK dropped: build with --format docker"
    dec, enc = tcp_addr(free_port()), tcp_addr(free_port())
    d, e = containers("dec"), containers("enc")
    run(["podman", "run", "-d", "--name", d, "--network", "host", "--user", "spiped",
         "-v", "%s:/spiped/key:ro" % keydir, image, "-d", "-s", dec, "-t", echo_target.addr])
    run(["podman", "run", "-d", "--name", e, "--network", "host",
         "-v", "%s:/spiped/key:ro" % keydir, image, "-e", "-s", enc, "-t", dec])
    wait_healthy(d)
    wait_healthy(e)
    echoes(enc, 1000000)
    stop_quickly(e)
    stop_quickly(d)


def test_image_tunnel_through_published_port(image, workdir, containers):
    """A port published on 127.0.0.1 reaches spiped -d, whose target (an echo
    server) shares its network namespace; the -e end runs on the host network."""
    keydir = podman_key(image, workdir)
    published, enc = free_port(), tcp_addr(free_port())
    pod_echo, d, e = containers("echo"), containers("dec"), containers("enc")
    echo_code = ("import socket,threading\n"
                 "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                 "s.bind(('127.0.0.1',7000)); s.listen(16)\n"
                 "def serve(c):\n"
                 "    while True:\n"
                 "        b=c.recv(65536)\n"
                 "        if not b: break\n"
                 "        c.sendall(b)\n"
                 "    c.close()\n"
                 "while True: threading.Thread(target=serve,args=(s.accept()[0],)).start()\n")
    run(["podman", "run", "-d", "--name", pod_echo, "-p", "127.0.0.1:%d:6380" % published,
         image, "python3", "-c", echo_code])
    run(["podman", "run", "-d", "--name", d, "--network", "container:" + pod_echo, "--user", "spiped",
         "-v", "%s:/spiped/key:ro" % keydir, image, "-d", "-s", "[0.0.0.0]:6380", "-t", "[127.0.0.1]:7000"])
    run(["podman", "run", "-d", "--name", e, "--network", "host",
         "-v", "%s:/spiped/key:ro" % keydir, image, "-e", "-s", enc, "-t", tcp_addr(published)])
    wait_healthy(d)
    wait_healthy(e)
    echoes(enc, 1000000)
    stop_quickly(d)


def need_yaml():
    """The yaml module (PyYAML, which the test extra's kubernetes-validate brings)."""
    try:
        import yaml
    except ImportError:
        unavailable("PyYAML is not installed (pip install -e '.[test]')")
    return yaml


def logs(name):
    p = run(["podman", "logs", name], check=False)
    return p.stdout + p.stderr


def http_status(addr, path="/healthz"):
    """(status, body) of GET PATH at spiped-style ADDR."""
    host, port = addr.rsplit(":", 1)
    try:
        with urllib.request.urlopen("http://%s:%s%s" % (host.strip("[]"), port, path),
                                    timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def exit_code(name):
    return run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip()


def process_status(name):
    """The spiped process's /proc status fields (Uid, Gid, CapEff, NoNewPrivs, Seccomp) in NAME."""
    pid = run(["podman", "inspect", "--format", "{{.State.Pid}}", name]).stdout.strip()
    with open("/proc/%s/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def pass_through(addr, key, payload=b"x" * 5000):
    """PAYLOAD through a local spiped -e with KEY (a file) in front of ADDR: what came back."""
    front = tcp_addr(free_port())
    p = subprocess.Popen(ours("-e", "-F", "-s", front, "-t", addr, "-k", key),
                         stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: address_listening(front), 30, "spiped -e on %s" % front)
        return exchange(front, payload, timeout=30)
    finally:
        p.kill()
        p.wait(timeout=10)


def test_image_locked_down_watch_and_byte_code(image, workdir, containers, echo_target):
    """--read-only --cap-drop ALL --security-opt no-new-privileges --user 999: the
    tunnel runs, spiped is loaded from the build's byte code, and --watch takes a
    key replaced by the generator (--force) without a signal."""
    keydir = podman_key(image, workdir)
    key = os.path.join(keydir, "spiped-keyfile")
    old = os.path.join(workdir, "old-%s.key" % uuid.uuid4().hex[:6])
    shutil.copy(key, old)
    dec = tcp_addr(free_port())
    d = containers("locked")
    run(["podman", "run", "-d", "--name", d, "--network", "host", "--read-only", "--cap-drop", "ALL",
         "--security-opt", "no-new-privileges", "--user", "999", "-v", "%s:/spiped/key:ro" % keydir,
         image, "-d", "-s", dec, "-t", echo_target.addr, "--watch-interval", "0.5"])
    wait_healthy(d)
    status = process_status(d)
    assert status["Uid"].split()[0] == "999" and status["Gid"].split()[0] == "999", status
    assert status["CapEff"] == "0000000000000000" and status["NoNewPrivs"] == "1", status
    readonly = run(["podman", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", d]).stdout
    assert readonly.strip() == "true"
    verbose = run(["podman", "exec", d, "python3", "-v", "/usr/local/bin/spiped", "-v"]).stderr
    assert "code object from '/usr/local/lib/spiped/__pycache__/spiped.cpython-" in verbose, \
        [l for l in verbose.splitlines() if "spiped" in l]
    assert pass_through(dec, key) == b"x" * 5000
    run(["podman", "run", "--rm", "--network", "none", "-v", "%s:/spiped/key" % keydir, image,
         "spiped-generate-key.sh", "--force"])
    wait_until(lambda: "reloaded 1 key" in logs(d), 30, "spiped in %s reloading the new key" % d)
    assert "/spiped/key/spiped-keyfile changed: reloading" in logs(d), logs(d)
    assert pass_through(dec, key) == b"x" * 5000
    assert pass_through(dec, old) == b""          # the replaced key is refused
    stop_quickly(d)


def compose_for_podman(image, keydir, published, project_file, changes):
    """contrib/docker/compose.yaml as this host can run it, written to PROJECT_FILE.

    CHANGES gets one line per substitution.
    """
    yaml = need_yaml()
    with open(COMPOSE) as f:
        compose = yaml.safe_load(f)
    spiped, target = compose["services"]["spiped"], compose["services"]["elasticsearch"]
    spiped["image"] = target["image"] = image
    del spiped["build"]
    changes.append("spiped: the image built by this run, not built by compose")
    target["command"] = ["python3", "-c", ECHO_STANDIN % 9200]
    target.pop("environment", None)
    changes.append("elasticsearch: the image built by this run running an echo server on 9200"
                   " (no registry here)")
    assert spiped["ports"] == ["9200:9200"]
    spiped["ports"] = ["127.0.0.1:%d:9200" % published]
    changes.append("spiped: published on 127.0.0.1:%d, not every address's 9200" % published)
    assert spiped["volumes"] == ["./key:/spiped/key:ro"]
    spiped["volumes"] = ["%s:/spiped/key:ro" % keydir]
    changes.append("spiped: the key folder %s in place of ./key" % keydir)
    with open(project_file, "w") as f:
        yaml.safe_dump(compose, f)


ECHO_STANDIN = ("import signal, socket, sys, threading\n"
                "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                "s = socket.create_server(('0.0.0.0', %d))\n"
                "def serve(c):\n"
                "    while True:\n"
                "        b = c.recv(65536)\n"
                "        if not b: break\n"
                "        c.sendall(b)\n"
                "    c.close()\n"
                "while True: threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()\n")
COMPOSE = os.path.join(ROOT, "contrib/docker/compose.yaml")


def test_compose_file_runs_with_podman_compose(image, workdir):
    """compose.yaml's -d in front of "elasticsearch" by name, under podman-compose."""
    need("podman-compose")
    keydir = os.path.join(workdir, "compose-key-%s" % uuid.uuid4().hex[:6])
    os.mkdir(keydir)
    run(["podman", "run", "--rm", "--network", "none", "-v", "%s:/spiped/key" % keydir, image,
         "spiped-generate-key.sh"])                 # the file's own step, as root
    project = "spiped-it-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
    project_file = os.path.join(workdir, project + ".yaml")
    published, changes = free_port(), []
    compose_for_podman(image, keydir, published, project_file, changes)
    print("compose.yaml as run here:\n  " + "\n  ".join(changes))
    compose = ["podman-compose", "-p", project, "-f", project_file]
    spiped = project + "_spiped_1"
    volumes = []
    try:
        run(compose + ["up", "-d"], timeout=300)
        for name in (spiped, project + "_elasticsearch_1"):
            volumes += run(["podman", "inspect", "--format", "{{range .Mounts}}{{.Name}} {{end}}",
                            name]).stdout.split()
        wait_healthy(spiped)
        user = run(["podman", "inspect", "--format", "{{.Config.User}}", spiped]).stdout
        assert user.strip() == "spiped"
        payload = os.urandom(300000)
        assert pass_through(tcp_addr(published), os.path.join(keydir, "spiped-keyfile"), payload) \
            == payload, logs(spiped)
        stop_quickly(spiped)
    finally:
        run(compose + ["down"], check=False, timeout=300)
        for volume in volumes:   # VOLUME /spiped's anonymous volumes: down (-v too) leaves them
            run(["podman", "volume", "rm", "-f", volume], check=False)
        run(["podman", "network", "rm", "-f", project + "_default"], check=False)
    left = run(["podman", "ps", "-a", "--format", "{{.Names}}",
                "--filter", "label=io.podman.compose.project=" + project]).stdout.split()
    assert not left, left
    assert run(["podman", "network", "exists", project + "_default"], check=False).returncode != 0
    assert not [v for v in volumes if run(["podman", "volume", "exists", v], check=False).returncode == 0]


KUBERNETES = os.path.join(ROOT, "contrib/kubernetes")
KUBE_NETWORK = "podman-default-kube-network"   # kube play makes it on first use
APP_STANDIN = "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); signal.pause()"
ROUNDTRIP_IN_APP = ("import os, socket, sys\n"
                    "c = socket.create_connection(('127.0.0.1', %d), timeout=20)\n"
                    "data = os.urandom(200000); c.sendall(data); c.shutdown(socket.SHUT_WR)\n"
                    "got = b''\n"
                    "while True:\n"
                    "    b = c.recv(65536)\n"
                    "    if not b: break\n"
                    "    got += b\n"
                    "print('OK' if got == data else 'MISMATCH %%d of %%d' %% (len(got), len(data)))\n")


def kube_for_podman(path, image, addresses, keydir, suffix, changes):
    """The Deployments of manifest PATH as podman 4.3 runs them on this host.

    ADDRESSES maps each address argument to its stand-in (every one must be
    used); KEYDIR takes the Secret's place; SUFFIX makes names unique.
    CHANGES gets one line per substitution.  Returns the YAML text.
    """
    yaml = need_yaml()
    base = os.path.basename(path)
    out = []
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind != "Deployment":
            changes.append("%s: %s %s left out (podman 4.3 runs Pods and Deployments;"
                           " checked by the schema only)" % (base, kind, name))
            continue
        doc["metadata"]["name"] = name + suffix
        changes.append("%s: Deployment %s named %s" % (base, name, name + suffix))
        if doc["spec"]["replicas"] != 1:
            changes.append("%s: %d replicas -> 1 (the host's ports)" % (base, doc["spec"]["replicas"]))
            doc["spec"]["replicas"] = 1
        spec = doc["spec"]["template"]["spec"]
        spec["hostNetwork"] = True
        changes.append("%s: hostNetwork: true (no traffic to bridge addresses)" % base)
        for volume in spec["volumes"]:
            if "secret" in volume:
                del volume["secret"]
                volume["hostPath"] = {"path": keydir, "type": "Directory"}
                changes.append("%s: Secret volume -> hostPath %s, laid out as the kubelet lays out"
                               " a Secret (podman 4.3 crashes on Secret volumes)" % (base, keydir))
        for c in spec["containers"]:
            c["image"] = image
            changes.append("%s: container %s: image -> %s" % (base, c["name"], image))
            for probe, why in (("readinessProbe", "podman 4.3 does not run readiness probes"),
                               ("livenessProbe", "podman 4.3 runs it as curl (httpGet) or nc"
                                " (tcpSocket) inside the container, and the image has neither")):
                if c.pop(probe, None) is not None:
                    changes.append("%s: container %s: %s left out (%s)" % (base, c["name"], probe, why))
            if c.pop("ports", None) is not None:
                changes.append("%s: container %s: ports left out (podman 4.3 publishes them,"
                               " which the host's network refuses)" % (base, c["name"]))
            if c["name"] == "app":
                c["command"] = ["python3", "-c", APP_STANDIN]
                changes.append("%s: container app: a Python stand-in that waits" % base)
            for i, arg in enumerate(c.get("args", [])):
                if arg in addresses:
                    c["args"][i] = addresses[arg]
                    changes.append("%s: container %s: %s -> %s" % (base, c["name"], arg, addresses[arg]))
        out.append(doc)
    used = {a for d in out for c in d["spec"]["template"]["spec"]["containers"]
            for a in c.get("args", [])}
    assert set(addresses.values()) <= used, (addresses, used)
    return yaml.safe_dump_all(out)


def test_kube_play_sidecar_and_decrypt(image, workdir, echo_target):
    """sidecar.yaml and decrypt.yaml under podman kube play: data from the app
    container through spiped -e to the -d pod and its target, /healthz, a
    Secret-style folder swapped under --watch (no signal), and podman pod stop
    draining a live connection to exit code 0; then kube down."""
    suffix = "-it-%d-%s" % (os.getpid(), uuid.uuid4().hex[:6])
    old, new = os.urandom(32), os.urandom(32)
    keydir = os.path.join(workdir, "kube-key" + suffix)
    secret = SecretFolder(keydir, "spiped-keyfile", "previous", mode=0o440, gid=999)  # fsGroup: 999
    secret.publish(**{"spiped-keyfile": old, "previous": old})
    os.chmod(keydir, 0o755)
    dsrc, dmetrics, esrc, emetrics = (tcp_addr(free_port()) for _ in range(4))
    changes = []
    decrypt = kube_for_podman(os.path.join(KUBERNETES, "decrypt.yaml"), image,
                              {"[0.0.0.0]:9200": dsrc, "elasticsearch:9200": echo_target.addr,
                               "[0.0.0.0]:9100": dmetrics}, keydir, suffix, changes)
    sidecar = kube_for_podman(os.path.join(KUBERNETES, "sidecar.yaml"), image,
                              {"[127.0.0.1]:9200": esrc, "spiped-elasticsearch:9200": dsrc,
                               "[0.0.0.0]:9100": emetrics}, keydir, suffix, changes)
    print("manifests as run here:\n  " + "\n  ".join(changes))
    files = []
    for name, text in (("decrypt", decrypt), ("sidecar", sidecar)):
        files.append(os.path.join(workdir, "kube-%s%s.yaml" % (name, suffix)))
        with open(files[-1], "w") as f:
            f.write(text)
    dpod, apod = "spiped-elasticsearch%s-pod-0" % suffix, "app%s-pod-0" % suffix
    network_was_there = run(["podman", "network", "exists", KUBE_NETWORK], check=False).returncode == 0
    old_key = os.path.join(workdir, "kube-old%s.key" % suffix)
    with open(old_key, "wb") as f:
        f.write(old)
    volumes = []   # the anonymous volumes of the image's VOLUME /spiped, which kube down leaves
    try:
        for path in files:
            run(["podman", "kube", "play", path], timeout=300)
        for name in (dpod + "-spiped", apod + "-spiped", apod + "-app"):
            volumes += run(["podman", "inspect", "--format", "{{range .Mounts}}{{.Name}} {{end}}",
                            name]).stdout.split()
        for addr in (dsrc, dmetrics, esrc, emetrics):
            wait_until(lambda: address_listening(addr), 60, "a pod listening on %s" % addr)
        for addr in (dmetrics, emetrics):
            assert http_status(addr) == (200, b"ok\n"), addr
        # restricted: what podman applies of it (runAsUser/Group, read-only root,
        # no capability, no privilege gain, seccomp)
        for name in (dpod + "-spiped", apod + "-spiped", apod + "-app"):
            s = process_status(name)
            got = (s["Uid"].split()[0], s["Gid"].split()[0], s["CapEff"], s["NoNewPrivs"], s["Seccomp"])
            assert got == ("999", "999", "0000000000000000", "1", "2"), (name, s)
            assert run(["podman", "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name]) \
                .stdout.strip() == "true", name
        # data from the application container, through the sidecar, to the -d pod and its target
        in_app = ["podman", "exec", apod + "-app", "python3", "-c",
                  ROUNDTRIP_IN_APP % int(esrc.rsplit(":", 1)[1])]
        app = run(in_app)
        assert app.stdout.strip() == "OK", app.stdout + logs(apod + "-spiped") + logs(dpod + "-spiped")
        for name in (dpod + "-spiped", apod + "-spiped"):
            assert "readable by group" not in logs(name), logs(name)   # 0440 root:999 is fine

        # --watch: the Secret's folder swapped to a new key; no signal is sent
        live = Conn(esrc)
        live.ping(0)
        secret.publish(**{"spiped-keyfile": new, "previous": new})
        wait_until(lambda: "reloaded 2 keys" in logs(dpod + "-spiped"), 30, "the -d pod reloading")
        wait_until(lambda: "reloaded 1 key" in logs(apod + "-spiped"), 30, "the sidecar reloading")
        live.ping(1)                                           # a live connection goes on
        app = run(in_app)
        assert app.stdout.strip() == "OK", app.stdout + logs(apod + "-spiped") + logs(dpod + "-spiped")
        assert pass_through(dsrc, old_key) == b""              # the old key is refused
        assert "changed: reloading" in logs(dpod + "-spiped")

        # podman pod stop: /healthz says 503 while the live connection drains; exit 0
        stopping = subprocess.Popen(["podman", "pod", "stop", "-t", "30", dpod],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: http_status(dmetrics)[0] == 503, 30, "/healthz 503 while draining")
            live.ping(2)
            assert stopping.poll() is None
            live.finish()
            assert stopping.wait(timeout=60) == 0, stopping.stdout.read()
        finally:
            if stopping.poll() is None:
                stopping.kill()
            stopping.wait()
        assert exit_code(dpod + "-spiped") == "0", logs(dpod + "-spiped")
        run(["podman", "pod", "stop", "-t", "30", apod], timeout=90)
        assert (exit_code(apod + "-spiped"), exit_code(apod + "-app")) == ("0", "0")
    finally:
        for path in reversed(files):
            run(["podman", "kube", "down", path], check=False, timeout=120)
        for pod in (apod, dpod):
            run(["podman", "pod", "rm", "-f", pod], check=False, timeout=120)
        for volume in volumes:
            run(["podman", "volume", "rm", "-f", volume], check=False)
        if not network_was_there:
            users = run(["podman", "ps", "-a", "--format", "{{.Names}}", "--filter",
                         "network=" + KUBE_NETWORK], check=False).stdout.split()
            if not users:
                run(["podman", "network", "rm", KUBE_NETWORK], check=False)
    left = run(["podman", "ps", "-a", "--format", "{{.Names}}", "--filter", "name=" + suffix]).stdout
    assert not left.split(), left
    assert run(["podman", "pod", "ps", "-q", "--filter", "name=" + suffix]).stdout.split() == []
    assert not [v for v in volumes if run(["podman", "volume", "exists", v], check=False).returncode == 0]


# ---------------------------------------------------------------- systemd

SYSTEMD_README = os.path.join(ROOT, "contrib/systemd/README.md")


@pytest.fixture(scope="session")
def systemd_box(nspawn_works, slim_rootfs, workdir):
    root = derived_rootfs(slim_rootfs, "rootfs-systemd",
                          ["systemd", "systemd-sysv", "dbus", "python3", "python3-pycryptodome", "procps"])
    for old in glob.glob(root + "/etc/systemd/system/spiped@*") + [root + "/etc/spiped"]:
        shutil.rmtree(old, ignore_errors=True)
    box = Booted(root, ["-b"], "systemd", os.path.join(workdir, "nspawn-systemd.log"))
    try:
        wait_until(lambda: box.sh("systemctl is-system-running", check=False).stdout.strip()
                   in ("running", "degraded"), 180, "systemd in the container up")
        yield box
    finally:
        box.stop()


def show(box, unit, *props):
    out = box.sh("systemctl show -p %s %s" % (",".join(props), unit)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def systemd_tunnels(systemd_box, echo_target):
    """The README's setup for spiped@smtp.service (the -d end, as written), then
    socket units for the -e ends: TCP, the template's unix socket, a port below 1024."""
    box = systemd_box
    ports = {"smtp": tcp_addr(free_port()), "enc": tcp_addr(free_port()), "low": free_low_port()}
    conf = ("sed -i -e 's|^MODE=.*|MODE=-d|' -e 's|^SOURCE=.*|SOURCE=%s|' -e 's|^TARGET=.*|TARGET=%s|' "
            "-e 's|^EXTRA=.*|EXTRA=\"-n 200 -o 10 --log-connections\"|' /etc/spiped/smtp.conf"
            % (ports["smtp"], echo_target.addr))
    steps = readme_steps(SYSTEMD_README, "## Setup on an empty host", {"editor": conf})
    box.sh("cd /root/spiped && set -ex\n" + steps, timeout=300)
    # The socket units, per the README's socket activation section.
    more = ["set -ex"]
    for name, listen, source in (("enc", ports["enc"].strip("[]").replace("]", ""), ports["enc"]),
                                 ("encu", None, "/run/spiped/encu.sock"),
                                 ("low", "127.0.0.1:%d" % ports["low"], "[127.0.0.1]:%d" % ports["low"])):
        more += ["cp -p /etc/spiped/smtp.key /etc/spiped/%s.key" % name,
                 "cp /root/spiped/contrib/systemd/example.conf /etc/spiped/%s.conf" % name,
                 "sed -i -e 's|^MODE=.*|MODE=-e|' -e 's|^SOURCE=.*|SOURCE=%s|' -e 's|^TARGET=.*|TARGET=%s|'"
                 " -e 's|^EXTRA=.*|EXTRA=|' /etc/spiped/%s.conf" % (source, ports["smtp"], name)]
        if listen:
            more += ["mkdir -p /etc/systemd/system/spiped@%s.socket.d" % name,
                     "printf '[Socket]\\nListenStream=\\nListenStream=%s\\n' "
                     ">/etc/systemd/system/spiped@%s.socket.d/listen.conf" % (listen, name)]
    more += ["systemctl daemon-reload",
             "systemctl enable --now spiped@enc.socket spiped@encu.socket spiped@low.socket"]
    box.sh("\n".join(more))
    ports["encu"] = box.path("/run/spiped/encu.sock")
    ports["low"] = tcp_addr(ports["low"])
    return ports


def test_systemd_tunnels_ready_and_status(systemd_box, systemd_tunnels):
    box, t = systemd_box, systemd_tunnels
    s = show(box, "spiped@smtp.service", "ActiveState", "SubState", "StatusText", "NRestarts", "Type")
    assert (s["Type"], s["ActiveState"], s["SubState"]) == ("notify", "active", "running")
    assert s["StatusText"], "spiped sent no STATUS="
    echoes(t["enc"], 1000000)                  # socket-activated TCP
    echoes(t["encu"])                          # the template's unix socket
    echoes(t["low"])                           # a port below 1024 through the socket unit
    for name in ("enc", "encu", "low"):
        s = show(box, "spiped@%s.service" % name, "ActiveState", "StatusText")
        assert s["ActiveState"] == "active" and s["StatusText"], (name, s)
    # One dynamic user, named after the template, for all instances.
    uids = set()
    for name in ("smtp", "enc"):
        pid = show(box, "spiped@%s.service" % name, "MainPID")["MainPID"]
        status = box.sh("cat /proc/%s/status" % pid).stdout
        uids.add(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    assert len(uids) == 1 and "0" not in uids, uids
    owner = box.sh("ls -ln /run/systemd/dynamic-uid/ 2>/dev/null; "
                   "getent passwd %s || true" % uids.pop()).stdout
    assert "spiped@" not in owner, owner


def test_systemd_graceful_stop_with_a_live_connection(systemd_box, systemd_tunnels):
    box, t = systemd_box, systemd_tunnels
    conn = Conn(t["enc"])
    conn.ping(0)
    stopping = box.popen("systemctl stop spiped@smtp.service")
    try:
        wait_until(lambda: show(box, "spiped@smtp.service", "ActiveState")["ActiveState"] == "deactivating",
                   30, "spiped@smtp deactivating")
        for i in range(1, 4):
            conn.ping(i)                          # still carried while stopping
        assert stopping.poll() is None
        conn.finish()
        assert stopping.wait(timeout=30) == 0
        s = show(box, "spiped@smtp.service", "Result", "ExecMainStatus", "ActiveState")
        assert (s["ActiveState"], s["Result"], s["ExecMainStatus"]) == ("inactive", "success", "0"), \
            box.sh("journalctl -b --no-pager -n 30 -u spiped@smtp.service").stdout
    finally:
        if stopping.poll() is None:
            stopping.kill()
        stopping.wait()
        box.sh("systemctl start spiped@smtp.service")


def test_systemd_sandbox_sigsys_and_watchdog(systemd_box, systemd_tunnels):
    """With SystemCallErrorNumber= emptied a filtered system call kills spiped
    (SIGSYS) instead of failing quietly with EPERM; the test also shortens
    WatchdogSec= to 3 s (drop-in) so a few watchdog periods pass quickly."""
    box, t = systemd_box, systemd_tunnels
    dropin = "/etc/systemd/system/spiped@.service.d/zz-integration-test.conf"
    box.sh("mkdir -p %s && printf '[Service]\\nSystemCallErrorNumber=\\nWatchdogSec=3s\\n' >%s && "
           "systemctl daemon-reload && systemctl restart spiped@smtp.service && "
           "systemctl stop spiped@enc.service spiped@encu.service spiped@low.service"
           % (os.path.dirname(dropin), dropin))
    try:
        assert show(box, "spiped@smtp.service", "WatchdogUSec")["WatchdogUSec"] == "3s"
        echoes(t["enc"], 2000000)
        echoes(t["encu"])
        echoes(t["low"])

        def both_running():  # the assertion names a unit that is not
            for name in ("smtp", "enc"):
                s = show(box, "spiped@%s.service" % name, "ActiveState", "NRestarts")
                assert s == {"ActiveState": "active", "NRestarts": "0"}, (name, s)
            return True
        assert_stays(both_running, 12, step=1)    # four watchdog periods
        echoes(t["enc"])
        journal = box.sh("journalctl -b --no-pager -u 'spiped@*'").stdout
        bad = [l for l in journal.splitlines()
               if re.search(r"SIGSYS|status=31|[Ww]atchdog timeout|not permitted|code=killed|core", l)]
        assert not bad, "\n".join(bad)
    finally:
        box.sh("rm -f %s && systemctl daemon-reload && systemctl restart spiped@smtp.service" % dropin)


def test_systemd_broken_instance_ends_failed(systemd_box):
    box = systemd_box
    started = time.monotonic()
    box.sh("systemctl start spiped@broken.service", check=False)
    wait_until(lambda: show(box, "spiped@broken.service", "ActiveState")["ActiveState"] == "failed",
               90, "spiped@broken (no .conf, no key) failed")
    took = time.monotonic() - started
    assert took < 65, "took %.0f s" % took
    box.sh("systemctl reset-failed spiped@broken.service", check=False)


# ---------------------------------------------------------------- OpenRC

OPENRC_README = os.path.join(ROOT, "contrib/openrc/README.md")


class SyslogListener:
    """Receives what is sent to /dev/log inside a container."""

    def __init__(self, path):
        if os.path.lexists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.lines = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self.lock:
                self.lines.append(data.decode(errors="replace"))

    def find(self, *words):
        with self.lock:
            return [l for l in self.lines if all(w in l for w in words)]

    def close(self):
        self.sock.close()


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@pytest.fixture(scope="session")
def openrc_box(nspawn_works, slim_rootfs, workdir):
    root = derived_rootfs(slim_rootfs, "rootfs-openrc",
                          ["openrc", "sysvinit-core", "python3", "python3-pycryptodome", "procps",
                           "adduser", "bsdutils"])
    for old in glob.glob(root + "/etc/init.d/spiped*") + glob.glob(root + "/etc/runlevels/*/spiped*"):
        os.unlink(old)
    shutil.rmtree(root + "/etc/spiped", ignore_errors=True)
    shutil.rmtree(root + "/etc/conf.d", ignore_errors=True)
    box = Booted(root, ["/sbin/openrc-init"], "openrc-init", os.path.join(workdir, "nspawn-openrc.log"))
    try:
        # softlevel appears as the boot begins; openrc-init runs `openrc` for
        # each runlevel, and the last one leaving means "default" is reached.
        # Starting services before that raced the boot: entering "default"
        # stopped a service started by hand and restarted one added to it.
        wait_until(lambda: _read(box.path("/run/openrc/softlevel")) == "default"
                   and box.sh("pgrep -x openrc", check=False).returncode == 1,
                   120, "OpenRC in its default runlevel")
        yield box
    finally:
        box.stop(poweroff="openrc-shutdown --poweroff now")


@pytest.fixture(scope="session")
def openrc_tunnels(openrc_box, echo_target):
    """The README's Debian steps as written (the editor step sets the -e end),
    then the -d end the same way, its key readable by group root (not spiped's
    group) so spiped warns."""
    box = openrc_box
    syslog = SyslogListener(box.path("/dev/log"))
    a, b = tcp_addr(free_port()), tcp_addr(free_port())
    confd = ("sed -i -e 's|^spiped_mode=.*|spiped_mode=\"%s\"|' -e 's|^spiped_source=.*|spiped_source=\"%s\"|'"
             " -e 's|^spiped_target=.*|spiped_target=\"%s\"|' -e 's|^spiped_opts=.*|spiped_opts=\"%s\"|' "
             "/etc/conf.d/spiped.%s")
    assert not os.path.exists(box.path("/etc/conf.d")), "the tree should be as Debian makes it"
    steps = readme_steps(OPENRC_README, "## Debian with OpenRC",
                         {"editor": confd % ("-e", a, b, "--log-connections", "smtp")})
    box.sh("cd /root/spiped && set -ex\n" + steps, timeout=300)
    box.sh("\n".join([
        "set -ex",
        "(umask 077; dd if=/dev/urandom of=/etc/spiped/smtpd.key bs=32 count=1)",
        "cp /etc/spiped/smtp.key /etc/spiped/smtpd.key && chown spiped:root /etc/spiped/smtpd.key",
        "chmod 0640 /etc/spiped/smtpd.key",
        "ln -s spiped /etc/init.d/spiped.smtpd",
        "install -m 0644 /root/spiped/contrib/openrc/spiped.confd /etc/conf.d/spiped.smtpd",
        confd % ("-d", b, echo_target.addr, "", "smtpd"),
        "rc-service spiped.smtpd start"]))
    # rc-service returns once supervise-daemon runs; spiped listens a little later.
    for addr in (a, b):
        try:
            wait_until(lambda: address_listening(addr), 30, "spiped listening on %s" % addr)
        except AssertionError as e:
            state = box.sh("rc-status -a; ps -eo pid,ppid,stat,args", check=False).stdout
            raise AssertionError("%s\n%s\nsyslog:\n%s" % (e, state, "\n".join(syslog.find(""))))
    try:
        yield {"enc": a, "dec": b, "syslog": syslog}
    finally:
        syslog.close()


def test_openrc_tunnel_and_warnings_in_syslog(openrc_box, openrc_tunnels):
    box, t = openrc_box, openrc_tunnels
    # Seen once on a loaded machine: "status: starting" just after the start
    # returned; the state must settle at "started".
    wait_until(lambda: "started" in box.sh("rc-service spiped.smtp status", check=False).stdout,
               30, "spiped.smtp started")
    echoes(t["enc"], 1000000)
    # spiped -d warned at start that its key is group-readable; the warning
    # and the -e end's --log-connections lines reach syslog with their tags.
    wait_until(lambda: t["syslog"].find("spiped.smtpd", "readable by group"), 30,
               "spiped.smtpd's key warning in syslog")
    wait_until(lambda: t["syslog"].find("spiped.smtp:", "accepted"), 30,
               "spiped.smtp's connection lines in syslog")
    for pid in spiped_host_pids("-d", t["dec"]):
        # stderr is the (already removed) FIFO logger reads, not /dev/null
        assert stat.S_ISFIFO(os.stat("/proc/%d/fd/2" % pid).st_mode), os.readlink("/proc/%d/fd/2" % pid)


def test_openrc_checkconfig_refusals(openrc_box, openrc_tunnels):
    box = openrc_box
    for break_it, repair, message in (
            ("chmod 0644 /etc/spiped/smtp.key", "chmod 0600 /etc/spiped/smtp.key", "readable by everyone"),
            ("chown root:root /etc/spiped/smtp.key", "chown spiped:spiped /etc/spiped/smtp.key",
             "not readable by user spiped"),
            ("mv /etc/spiped/smtp.key /etc/spiped/smtp.key.away", "mv /etc/spiped/smtp.key.away /etc/spiped/smtp.key",
             "does not exist")):
        box.sh(break_it)
        try:
            p = box.sh("rc-service spiped.smtp checkconfig", check=False)
            assert p.returncode != 0 and message in p.stdout + p.stderr, p.stdout + p.stderr
        finally:
            box.sh(repair)
    p = box.sh("rc-service spiped checkconfig", check=False)
    assert p.returncode != 0 and "one tunnel per instance" in p.stdout + p.stderr
    assert box.sh("rc-service spiped.smtp checkconfig", check=False).returncode == 0


def test_openrc_respawn_after_kill9(openrc_box, openrc_tunnels):
    t = openrc_tunnels
    before = spiped_host_pids("-d", t["dec"])
    assert len(before) == 1, (before, "\n".join(t["syslog"].find("")[-40:]))
    os.kill(before[0], signal.SIGKILL)
    try:
        # supervise-daemon waits respawn_delay (2 s), then runs the service's
        # command again; under load that can take a while.
        after = wait_until(lambda: [p for p in spiped_host_pids("-d", t["dec"])
                                    if p != before[0]], 60, "spiped.smtpd respawned")
        assert len(after) == 1, after
        wait_until(lambda: exchange(t["enc"], b"after respawn") == b"after respawn", 30,
                   "the tunnel carries data again")
    except (AssertionError, OSError) as e:  # what OpenRC saw, for whoever reads the failure
        status = openrc_box.sh("rc-service spiped.smtpd status; ps -eo pid,args", check=False)
        raise AssertionError("%s\n%s%s\nsyslog:\n%s" % (
            e, status.stdout, status.stderr, "\n".join(t["syslog"].find("")[-40:]))) from None


def test_openrc_graceful_stop_with_a_live_connection(openrc_box, openrc_tunnels):
    box, t = openrc_box, openrc_tunnels
    conn = Conn(t["enc"])
    conn.ping(0)
    pid = spiped_host_pids("-d", t["dec"])[0]
    stopping = box.popen("rc-service spiped.smtpd stop")
    try:
        wait_until(lambda: os.path.lexists(box.path("/run/openrc/stopping/spiped.smtpd")), 30,
                   "spiped.smtpd stopping")
        for i in range(1, 4):
            conn.ping(i)                          # still carried while stopping
        assert stopping.poll() is None
        conn.finish()
        assert stopping.wait(timeout=30) == 0, stopping.stdout.read()
        wait_until(lambda: not os.path.exists("/proc/%d" % pid), 10, "spiped -d exited")
    finally:
        if stopping.poll() is None:
            stopping.kill()
        stopping.wait()
        box.sh("rc-service spiped.smtpd start")
        wait_until(lambda: address_listening(t["dec"]), 30, "spiped.smtpd listening again")

