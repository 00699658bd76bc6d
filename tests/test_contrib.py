"""contrib/: the container image, the systemd units and the OpenRC service.

The shell scripts run under /bin/sh with stand-ins on PATH that record how
they were called.  The unit files are checked with systemd-analyze where it
can run here, and the command line they build is run with our spiped.  The
image, the units and the OpenRC service run for real in
tests/test_integration.py.
"""
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys

import pytest

from conftest import (ROOT, SPIPED_PY, Notify, connect, exchange, free_port, ours, read_text,
                      recv_exact, tcp_addr, wait_for, wait_listening, write_key)

CONTRIB = os.path.join(ROOT, "contrib")
DOCKER = os.path.join(CONTRIB, "docker")
SYSTEMD = os.path.join(CONTRIB, "systemd")
OPENRC = os.path.join(CONTRIB, "openrc")
ENTRYPOINT = os.path.join(DOCKER, "docker-entrypoint.sh")
GENERATOR = os.path.join(DOCKER, "spiped-generate-key.sh")
HEALTHCHECK = os.path.join(DOCKER, "spiped-healthcheck")
SERVICE = os.path.join(SYSTEMD, "spiped@.service")
SOCKET = os.path.join(SYSTEMD, "spiped@.socket")
EXAMPLE_CONF = os.path.join(SYSTEMD, "example.conf")
OPENRC_SCRIPT = os.path.join(OPENRC, "spiped")
OPENRC_CONFD = os.path.join(OPENRC, "spiped.confd")
INSTALLED_SPIPED = "/usr/local/bin/spiped"   # where the units and scripts expect it


# ---------------------------------------------------------------- helpers

def write_exe(path, text):
    """Write an executable file at PATH and return PATH as a string."""
    path = str(path)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def recorder(bindir, name, status=0):
    """A stand-in NAME in BINDIR that records its PID and argv, then exits STATUS.

    Returns the path of the record: the PID on the first line, then one
    argument per line.
    """
    record = os.path.join(str(bindir), name + ".argv")
    write_exe(os.path.join(str(bindir), name),
              '#!/bin/sh\n{ echo "$$"; printf "%%s\\n" "$@"; } > %s\nexit %d\n'
              % (shlex.quote(record), status))
    return record


def read_record(record):
    with open(record) as f:
        lines = f.read().split("\n")[:-1]
    return int(lines[0]), lines[1:]


def run_sh(script, *args, env=None, cwd=None, timeout=20):
    """Run SCRIPT with /bin/sh; return the CompletedProcess (text output)."""
    return subprocess.run(["/bin/sh", script, *args], env=env, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)


def env_with(bindir=None, **extra):
    """os.environ with BINDIR first on PATH and EXTRA set (None removes a name)."""
    env = dict(os.environ)
    if bindir is not None:
        env["PATH"] = "%s:%s" % (bindir, env.get("PATH", "/usr/bin:/bin"))
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------- docker: entry point

@pytest.fixture
def bindir(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    return d


def entrypoint(bindir, *args, key=None, status=0):
    """Run the entry point with a recording stand-in spiped; return (proc, pid, argv)."""
    record = recorder(bindir, "spiped", status)
    env = env_with(bindir, SPIPED_KEY=key)
    p = subprocess.Popen(["/bin/sh", ENTRYPOINT, *args], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=20)
    p.stdout_text, p.stderr_text = out, err
    if not os.path.exists(record):
        return p, None, None
    pid, argv = read_record(record)
    return p, pid, argv


def test_entrypoint_options_run_spiped_in_foreground_with_key(bindir, tmp_path):
    key = tmp_path / "keyfile"
    key.write_bytes(os.urandom(32))
    args = ["-d", "-s", "[0.0.0.0]:8025", "-t", "target host:25", "-n", "5", "--log-connections"]
    p, pid, argv = entrypoint(bindir, *args, key=key)
    assert p.returncode == 0, p.stderr_text
    assert argv == ["-k", str(key), "-F", *args]
    # exec, not a child: spiped takes the entry point's PID (PID 1 in a container).
    assert pid == p.pid


def test_entrypoint_key_directory_from_generator_uses_spiped_keyfile(bindir, tmp_path):
    keydir = tmp_path / "key"
    keydir.mkdir()
    (keydir / "spiped-keyfile").write_bytes(os.urandom(32))
    p, _, argv = entrypoint(bindir, "-e", "-s", "[0.0.0.0]:1", "-t", "h:2", key=keydir)
    assert p.returncode == 0
    assert argv[:3] == ["-k", str(keydir / "spiped-keyfile"), "-F"]
    assert p.stderr_text == ""


def test_entrypoint_empty_key_directory_is_passed_on_with_a_hint(bindir, tmp_path):
    keydir = tmp_path / "key"
    keydir.mkdir()
    p, _, argv = entrypoint(bindir, "-e", "-s", "[0.0.0.0]:1", "-t", "h:2", key=keydir)
    assert argv[:3] == ["-k", str(keydir), "-F"]
    assert "spiped-generate-key.sh" in p.stderr_text


def test_entrypoint_missing_key_is_left_to_spiped(bindir, tmp_path):
    missing = tmp_path / "nothing-here"
    p, _, argv = entrypoint(bindir, "-v", key=missing)
    assert argv == ["-k", str(missing), "-F", "-v"]
    assert p.stderr_text == ""


@pytest.mark.skipif(os.path.exists("/spiped/key"), reason="this host has a /spiped/key of its own")
def test_entrypoint_default_key_path(bindir):
    _, _, argv = entrypoint(bindir, "-d", "-s", "[0.0.0.0]:1", "-t", "h:2", key=None)
    assert argv[:3] == ["-k", "/spiped/key", "-F"]


def test_entrypoint_passes_spiped_exit_status(bindir, tmp_path):
    p, _, _ = entrypoint(bindir, "-d", key=tmp_path / "k", status=3)
    assert p.returncode == 3


def test_entrypoint_runs_other_commands_as_given(bindir, tmp_path):
    # "spiped ..." itself: no -k, no -F added.
    p, _, argv = entrypoint(bindir, "spiped", "-v", key=tmp_path / "k")
    assert argv == ["-v"]
    # spipe and the generator are found on PATH and get their arguments untouched.
    for name, args in (("spipe", ["-t", "host:8025", "-k", "/spiped/key/spiped-keyfile"]),
                       ("spiped-generate-key.sh", ["--force"])):
        record = recorder(bindir, name)
        p = run_sh(ENTRYPOINT, name, *args, env=env_with(bindir))
        assert p.returncode == 0, p.stderr
        assert read_record(record)[1] == args
    p = run_sh(ENTRYPOINT, "sh", "-c", 'echo "hello $1"', "sh", "a b", env=env_with(bindir))
    assert (p.returncode, p.stdout) == (0, "hello a b\n")


# ---------------------------------------------------------------- docker: key generator

def generate(keydir, *args, bindir=None, umask=0o022):
    """Run the generator with SPIPED_KEY=KEYDIR under UMASK."""
    env = env_with(bindir, SPIPED_KEY=keydir)
    return subprocess.run(["/bin/sh", "-c", 'umask %o; exec /bin/sh "$0" "$@"' % umask,
                           GENERATOR, *args], env=env, timeout=20,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)


def test_generator_writes_32_random_bytes_mode_0600(tmp_path):
    keydir = tmp_path / "key"
    p = generate(keydir, umask=0)
    assert p.returncode == 0, p.stderr
    keyfile = keydir / "spiped-keyfile"
    assert mode_of(keyfile) == 0o600
    assert mode_of(keydir) == 0o700
    assert len(keyfile.read_bytes()) == 32
    assert os.listdir(keydir) == ["spiped-keyfile"]      # no temporary left behind


def test_generator_keeps_an_existing_key_unless_forced(tmp_path):
    keydir = tmp_path / "key"
    assert generate(keydir).returncode == 0
    keyfile = keydir / "spiped-keyfile"
    first = keyfile.read_bytes()
    p = generate(keydir)
    assert p.returncode == 1
    assert "--force" in p.stderr
    assert keyfile.read_bytes() == first
    p = generate(keydir, "--force")
    assert p.returncode == 0, p.stderr
    second = keyfile.read_bytes()
    assert len(second) == 32 and second != first
    assert mode_of(keyfile) == 0o600


def test_generator_rejects_bad_use(tmp_path):
    assert generate(tmp_path / "key", "--bogus").returncode == 1
    assert not (tmp_path / "key").exists()
    plain = tmp_path / "plainfile"
    plain.write_bytes(b"x")
    assert generate(plain).returncode == 1


@pytest.mark.parametrize("spiped_user_exists", [True, False])
def test_generator_gives_key_to_spiped_user_when_root(tmp_path, bindir, spiped_user_exists):
    # A stand-in id(1) says "root" and whether user spiped exists; chown(1) records.
    write_exe(bindir / "id", '#!/bin/sh\n[ "$1" = -u ] && { echo 0; exit 0; }\nexit %d\n'
              % (0 if spiped_user_exists else 1))
    record = recorder(bindir, "chown")
    keydir = tmp_path / "key"
    p = generate(keydir, bindir=bindir)
    assert p.returncode == 0, p.stderr
    assert (keydir / "spiped-keyfile").exists()
    if spiped_user_exists:
        owner, path = read_record(record)[1]
        assert owner == "spiped:spiped"
        assert os.path.dirname(path) == str(keydir)
    else:
        assert not os.path.exists(record)


# ---------------------------------------------------------------- docker: health check

STANDIN_DAEMON = '''import socket, sys, time
kind = sys.argv[1]
if kind == "tcp":
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
elif kind == "unix":
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[2])
    s.listen(1)
elif kind == "client":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
print("ready", flush=True)
time.sleep(60)
'''


@pytest.fixture
def standin(tmp_path, procs):
    """Start a process whose command line looks like spiped and that listens as told."""
    os.makedirs(tmp_path / "sbin", exist_ok=True)

    def start(kind, name="spiped"):
        script = write_exe(tmp_path / "sbin" / name, STANDIN_DAEMON)
        p = procs.start([sys.executable, script, kind, str(tmp_path / "h.sock")],
                        stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "ready\n"
        return p
    return start


def healthcheck(*args):
    return subprocess.run([sys.executable, HEALTHCHECK, *args], timeout=20,
                          capture_output=True, text=True)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_healthcheck_healthy_while_listening(standin, kind):
    p = standin(kind)
    h = healthcheck(str(p.pid))
    assert h.returncode == 0, h.stdout
    assert "is listening" in h.stdout


def test_healthcheck_unhealthy_without_listening_socket(standin):
    p = standin("client")
    h = healthcheck(str(p.pid))
    assert h.returncode == 1
    assert "no listening socket" in h.stdout


def test_healthcheck_recognises_our_spiped(procs, keyfile, tmp_path):
    daemon = procs.spiped("-d", tcp_addr(free_port()), keyfile, source=str(tmp_path / "hc.sock"))
    h = healthcheck(str(daemon.pid))
    assert h.returncode == 0, h.stdout
    assert "is listening" in h.stdout


def test_healthcheck_counts_the_tunnels_of_a_config(procs, keyfile, tmp_path):
    line = "-e -s %s -t [127.0.0.1]:1 -k " + keyfile + "\n"
    first, second = str(tmp_path / "one.sock"), tcp_addr(free_port())
    conf = tmp_path / "t.conf"
    conf.write_text("# two tunnels\n" + line % first + line % second)
    daemon = procs.daemon(ours("--config", str(conf), "-F"), first, second)
    h = healthcheck(str(daemon.pid))
    assert h.returncode == 0, h.stdout
    assert "is listening (2 of 2 tunnels)" in h.stdout
    conf.write_text(conf.read_text() + line % tcp_addr(free_port()))  # not reloaded yet
    h = healthcheck(str(daemon.pid))
    assert h.returncode == 1, h.stdout
    assert "listens for 2 of 3 tunnels" in h.stdout


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_healthcheck_unhealthy_while_draining(procs, keyfile, echo, tmp_path, kind):
    """After SIGTERM the tunnel listens no more, even while --metrics still answers
    and a live connection keeps the process running."""
    target = echo()
    source = tcp_addr(free_port()) if kind == "tcp" else str(tmp_path / "hc.sock")
    metrics = str(tmp_path / "metrics.sock")
    daemon = procs.spiped("-d", target.addr, keyfile, "--metrics", metrics, source=source)
    wait_listening(metrics, daemon)
    h = healthcheck(str(daemon.pid))
    assert h.returncode == 0, h.stdout
    assert "is listening" in h.stdout
    held = connect(procs.spiped("-e", source, keyfile).addr)
    held.sendall(b"held")
    assert recv_exact(held, 4) == b"held"
    daemon.send_signal(signal.SIGTERM)
    assert wait_for(lambda: healthcheck(str(daemon.pid)).returncode == 1, step=0.2)
    assert "has no listening socket" in healthcheck(str(daemon.pid)).stdout
    assert daemon.poll() is None
    held.close()
    assert daemon.wait(timeout=20) == 0


def test_healthcheck_ignores_other_programs(standin):
    p = standin("client", name="spipe")
    h = healthcheck(str(p.pid))
    assert h.returncode == 0
    assert "nothing to check" in h.stdout
    assert healthcheck("not-a-pid").returncode == 2


# ---------------------------------------------------------------- shellcheck

# Why each exclusion is needed; nothing else is excluded.
OPENRC_EXCLUDES = {
    # openrc-run reads name, description, command, command_args, supervisor, ...
    # after sourcing the script, so they look unused to shellcheck.
    "SC2034": "variables read by openrc-run, not by the script",
    # spiped_mode, spiped_opts, ... come from /etc/conf.d/spiped.NAME, which
    # openrc-run sources before the script.
    "SC2154": "variables set in the conf.d file",
}
SHELL_SCRIPTS = [
    (ENTRYPOINT, []),
    (GENERATOR, []),
    (OPENRC_SCRIPT, ["--shell=sh", "--exclude=" + ",".join(sorted(OPENRC_EXCLUDES))]),
    # The conf.d file is only assignments, each read by the service script.
    (OPENRC_CONFD, ["--shell=sh", "--exclude=SC2034"]),
]


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script,options", SHELL_SCRIPTS,
                         ids=[os.path.relpath(s, CONTRIB) for s, _ in SHELL_SCRIPTS])
def test_shellcheck_clean(script, options):
    p = subprocess.run(["shellcheck", *options, script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_shell_scripts_are_executable():
    for script in (ENTRYPOINT, GENERATOR, HEALTHCHECK, OPENRC_SCRIPT):
        assert os.access(script, os.X_OK), script


# ---------------------------------------------------------------- docker: the image

def dockerfile_instructions():
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    with open(os.path.join(DOCKER, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_keeps_the_official_contract():
    ins = dockerfile_instructions()
    found = {}
    for word, rest in ins:
        found.setdefault(word, []).append(rest)
    assert found["WORKDIR"] == ["/spiped"]
    assert found["VOLUME"] == ["/spiped"]
    assert found["ENTRYPOINT"] == ['["docker-entrypoint.sh"]']
    assert "USER" not in found                    # root unless --user is given
    assert "spiped-healthcheck" in found["HEALTHCHECK"][0]
    assert any("useradd" in r and "spiped" in r for r in found["RUN"])
    # Every file copied in is in the repository (the build context is ROOT).
    for rest in found["COPY"]:
        for src in rest.split()[:-1]:
            assert os.path.exists(os.path.join(ROOT, src)), src


def test_dockerfile_copies_the_man_pages():
    """spiped.1 and spipe.1 (the image has no spiped-keygen) land in /usr/local/share/man/man1."""
    copies = [rest.split() for word, rest in dockerfile_instructions() if word == "COPY"]
    pages = [src for *sources, dest in copies if dest.rstrip("/") == "/usr/local/share/man/man1"
             for src in sources]
    assert sorted(pages) == ["contrib/man/spipe.1", "contrib/man/spiped.1"], copies


def test_dockerfile_fixes_the_ids_and_loads_compiled_byte_code():
    """uid and gid 999 whatever the base image holds; spiped and spipe import
    the module from a cache compiled at build (a read-only root keeps none)."""
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert re.search(r"groupadd --system --gid 999 spiped;", runs), runs
    assert re.search(r"useradd --system --uid 999 --gid spiped ", runs), runs
    assert "python3 -m compileall -q /usr/local/lib/spiped;" in runs
    assert "'import spiped'" in runs and "ln -s spiped /usr/local/bin/spipe;" in runs
    assert "ln -s ../lib/spiped/spiped.py" not in runs  # a script is compiled at every start


# ---------------------------------------------------------------- systemd

def unit_settings(path):
    """{key: [values]} of a unit file, all sections together."""
    settings = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and line[0] not in "#;[" and "=" in line:
                key, _, value = line.partition("=")
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def environment_file(path):
    """The variables of a systemd EnvironmentFile (KEY=VALUE, optionally quoted)."""
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            key, _, value = line.partition("=")
            value = value.strip()
            if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0]:
                value = value[1:-1]
            env[key.strip()] = value
    return env


def expand_exec(line, env):
    """Expand an ExecStart= line as systemd does: $X splits into words, ${X} does not."""
    argv = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


def test_service_settings_the_issue_asks_for():
    s = unit_settings(SERVICE)
    assert s["Type"] == ["notify"]
    assert s["EnvironmentFile"] == ["/etc/spiped/%i.conf"]
    assert s["DynamicUser"] == ["yes"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in s["SystemCallFilter"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    argv = shlex.split(s["ExecStart"][0])
    assert argv[0] == INSTALLED_SPIPED and "-F" in argv
    assert argv[argv.index("--log-label") + 1] == "%i"  # lines name the instance
    # The key is the credential LoadCredential= loads.
    credential = s["LoadCredential"][0].split(":")[0]
    assert "${CREDENTIALS_DIRECTORY}/%s" % credential in argv
    conf = environment_file(EXAMPLE_CONF)
    assert set(conf) == {"MODE", "SOURCE", "TARGET", "EXTRA"}


def systemd_analyze_or_skip():
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return exe


def units_in(tmp_path, instance=None):
    """Copies of both units in TMP_PATH whose ExecStart runs a stand-in spiped.

    systemd-analyze checks that the ExecStart program exists; spiped need not be
    installed where the tests run.  With INSTANCE, the copies are named as that
    instance (spiped@INSTANCE.service) instead of as templates.
    """
    fake = write_exe(tmp_path / "spiped", "#!/bin/sh\nexit 0\n")
    paths = []
    for src in (SERVICE, SOCKET):
        with open(src) as f:
            text = f.read().replace(INSTALLED_SPIPED + " ", fake + " ")
        name = os.path.basename(src)
        if instance:
            name = name.replace("@.", "@%s." % instance)
        dst = tmp_path / name
        dst.write_text(text)
        paths.append(str(dst))
    return paths


def test_systemd_analyze_verify(tmp_path):
    exe = systemd_analyze_or_skip()
    # First a unit that is certainly fine: if even that fails, verify itself
    # can't run here (no usable manager environment), which is not our fault.
    control = tmp_path / "control"
    control.mkdir()
    (control / "contrib-control.service").write_text(
        "[Unit]\nDescription=control\n[Service]\nType=oneshot\nExecStart=/bin/true\n")
    p = subprocess.run([exe, "verify", "--man=no", str(control / "contrib-control.service")],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0 or p.stdout.strip() or p.stderr.strip():
        pytest.skip("systemd-analyze verify cannot run here: %s" % (p.stderr or p.stdout).strip()[:300])
    units = tmp_path / "units"
    units.mkdir()
    paths = units_in(units)
    p = subprocess.run([exe, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown or unparsable settings too, so any message fails.
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p.stdout + p.stderr


def test_systemd_analyze_security_rating(tmp_path):
    exe = systemd_analyze_or_skip()
    service = units_in(tmp_path, instance="example")[0]
    p = subprocess.run([exe, "security", "--offline=true", service],
                       capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", p.stdout)
    if found is None:
        pytest.skip("systemd-analyze security --offline=true cannot run here (needs systemd 250+): %s"
                    % (p.stderr or p.stdout).strip()[:300])
    assert float(found.group(1)) <= 2.0, p.stdout


@pytest.fixture
def notify(tmp_path, closing):
    return closing(Notify(str(tmp_path / "notify")))


def service_command(tmp_path, keyfile, **overrides):
    """argv and environment with which systemd would start spiped@example.service.

    The configuration is example.conf with OVERRIDES (addresses on this
    machine); the key is a credential in a directory under TMP_PATH.
    """
    s = unit_settings(SERVICE)
    conf = environment_file(EXAMPLE_CONF)
    conf.update(overrides)
    creds = tmp_path / "credentials"
    creds.mkdir()
    credential = s["LoadCredential"][0].split(":")[0]
    shutil.copy(keyfile, creds / credential)
    env = dict(conf, CREDENTIALS_DIRECTORY=str(creds))
    argv = expand_exec(s["ExecStart"][0], env)
    assert argv[0] == INSTALLED_SPIPED
    return [sys.executable, SPIPED_PY, *argv[1:]], env_with(None, **env)


def test_service_command_line_runs_our_spiped(tmp_path, keyfile, procs, echo, notify):
    """ExecStart with example.conf starts, reports READY=1, carries data, pings the
    watchdog and stops cleanly."""
    target = echo()
    source = tcp_addr(free_port())
    cmd, env = service_command(tmp_path, keyfile, SOURCE=source, TARGET=target.addr)
    env["NOTIFY_SOCKET"] = notify.env
    env["WATCHDOG_USEC"] = "2000000"       # what WatchdogSec= sets, shortened
    # The example's options really are on the command line.
    assert cmd[2:4] == ["-d", "-s"] and cmd[-4:] == ["-n", "200", "-o", "10"]
    daemon = procs.daemon(cmd, source, env=env)
    notify.wait_for_text("READY=1", timeout=15.0, proc=daemon)
    client = procs.spiped("-e", source, keyfile).addr
    assert exchange(client, b"through the unit's command line") == b"through the unit's command line"
    notify.wait_for_text("WATCHDOG=1", timeout=15.0, proc=daemon)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    notify.wait_for_text("STOPPING=1", timeout=15.0)


def test_socket_unit_activation_runs_our_spiped(tmp_path, keyfile, procs, echo, notify):
    """What spiped@.socket hands over (a unix socket as fd 3) is what spiped serves."""
    s = unit_settings(SOCKET)
    assert s["ListenStream"] == ["/run/spiped/%i.sock"]
    target = echo()
    not_bound = str(tmp_path / "not-bound.sock")
    cmd, env = service_command(tmp_path, keyfile, SOURCE=not_bound, TARGET=target.addr)
    env["NOTIFY_SOCKET"] = notify.env
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "activated.sock")
    listener.bind(path)
    os.chmod(path, int(s["SocketMode"][0], 8))
    listener.listen(16)
    try:
        # As systemd does: the socket as fd 3, LISTEN_PID naming the process itself.
        daemon = procs.activated(cmd, [listener], env=env)
        notify.wait_for_text("READY=1", timeout=15.0, proc=daemon)
        client = procs.spiped("-e", path, keyfile).addr
        assert exchange(client, b"socket activated") == b"socket activated"
        assert not os.path.exists(not_bound)
        assert mode_of(path) == 0o660
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
    finally:
        listener.close()


# ---------------------------------------------------------------- OpenRC

OPENRC_HARNESS = r'''
# Stand-ins for what openrc-run provides, then the conf.d file and the script.
eerror() { echo "E $*"; }
ewarn() { echo "W $*"; }
einfo() { echo "I $*"; }
ebegin() { :; }
eend() { :; }
need() { echo "depend: need $*"; }
use() { echo "depend: use $*"; }
after() { echo "depend: after $*"; }
RC_SVCNAME=$1
CONFD=$2
SCRIPT=$3
shift 3
[ -n "$CONFD" ] && . "$CONFD"
for assignment in "$@"; do
	eval "$assignment"
done
. "$SCRIPT"
case $ACTION in
checkconfig)
	checkconfig
	;;
show)
	echo "supervisor=$supervisor"
	echo "command=$command"
	echo "command_user=$command_user"
	depend
	eval "set -- $command_args"
	printf 'arg %s\n' "$@"
	;;
esac
'''


def openrc(tmp_path, svcname, action, *assignments, confd=OPENRC_CONFD):
    """Source the OpenRC script as openrc-run would and run ACTION (checkconfig or show)."""
    harness = tmp_path / "harness.sh"
    harness.write_text(OPENRC_HARNESS)
    return subprocess.run(["/bin/sh", str(harness), svcname, confd or "", OPENRC_SCRIPT,
                           *assignments], cwd=str(tmp_path), env=env_with(None, ACTION=action),
                          capture_output=True, text=True, timeout=20)


def test_openrc_service_definition(tmp_path):
    # A file in the working directory that the address [127.0.0.1]:2525 would
    # match as a glob pattern: command_args must quote it.
    (tmp_path / "1:2525").write_text("")
    p = openrc(tmp_path, "spiped.smtp", "show")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "supervisor=supervise-daemon" in lines
    assert "command=/bin/sh" in lines
    assert "command_user=spiped" in lines
    # Debian's OpenRC has nothing that provides net: "need net" never starts.
    assert "depend: use net dns logger" in lines
    assert not [l for l in lines if l.startswith("depend: need")]
    args = [l[4:] for l in lines if l.startswith("arg ")]
    assert args[0] == "-c" and args[2:] == [
        "sh", "spiped.smtp", "daemon.notice", INSTALLED_SPIPED,
        "-e", "-s", "[127.0.0.1]:2525", "-t", "mail.example.com:8025",
        "-k", "/etc/spiped/smtp.key", "--log-label", "smtp", "-F"]
    # Without logger, spiped itself is the command.
    p = openrc(tmp_path, "spiped.smtp", "show", "spiped_syslog=")
    lines = p.stdout.splitlines()
    assert "command=%s" % INSTALLED_SPIPED in lines
    assert [l[4:] for l in lines if l.startswith("arg ")] == [
        "-e", "-s", "[127.0.0.1]:2525", "-t", "mail.example.com:8025",
        "-k", "/etc/spiped/smtp.key", "--log-label", "smtp", "-F"]


def test_openrc_command_args_parse_with_our_cli(tmp_path, keyfile, procs, echo):
    """The command line the script builds from a conf.d file is one our spiped
    runs, with its stderr handed to logger (a stand-in here that records)."""
    target = echo()
    source = tcp_addr(free_port())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "logger.record"
    write_exe(bindir / "logger", '#!/bin/sh\necho "args: $*" >>"%s"\ncat >>"%s"\n' % (record, record))
    spiped = write_exe(bindir / "spiped", '#!/bin/sh\nexec "%s" "%s" "$@"\n' % (sys.executable, SPIPED_PY))
    os.chmod(keyfile, 0o604)                    # spiped warns about this at start
    p = openrc(tmp_path, "spiped.smtp", "show", "spiped_mode=-d", "spiped_source='%s'" % source,
               "spiped_target='%s'" % target.addr, "spiped_key='%s'" % keyfile,
               "spiped_opts='-n 200 -o 10 --log-connections'", "spiped_command='%s'" % spiped)
    command = [l[8:] for l in p.stdout.splitlines() if l.startswith("command=")][0]
    args = [l[4:] for l in p.stdout.splitlines() if l.startswith("arg ")]
    fifo_dir = tmp_path / "tmp"
    fifo_dir.mkdir()
    daemon = procs.daemon([command, *args], source,
                          env=env_with(str(bindir), TMPDIR=str(fifo_dir)))
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    warning = "readable by group or others"
    assert wait_for(lambda: warning in read_text(record), 15), \
        "%s never got %r" % (record, warning)
    text = record.read_text()
    assert "args: -t spiped.smtp -p daemon.notice" in text
    assert "spiped: smtp: WARNING: key file" in text  # --log-label: the instance name
    assert not os.listdir(fifo_dir)             # the FIFO is gone once connected


@pytest.fixture
def rc_key(tmp_path):
    """A good key for OpenRC checks: 32 bytes, mode 0600, owned by the test's user."""
    key = tmp_path / "smtp.key"
    write_key(key)
    return key


def checkconfig(tmp_path, key, *assignments, svcname="spiped.smtp"):
    me = pwd.getpwuid(os.getuid()).pw_name
    return openrc(tmp_path, svcname, "checkconfig", "spiped_key='%s'" % key,
                  "spiped_user='%s'" % me, "spiped_command='%s'" % sys.executable, *assignments)


def test_openrc_checkconfig_accepts_a_good_setup(tmp_path, rc_key):
    p = checkconfig(tmp_path, rc_key)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not [l for l in p.stdout.splitlines() if l[:2] in ("E ", "W ")]


@pytest.mark.parametrize("svcname,assignment,message", [
    ("spiped", "", "one tunnel per instance"),
    ("spiped.smtp", "spiped_mode=-x", "spiped_mode must be -e or -d"),
    ("spiped.smtp", "spiped_target=", "set spiped_source and spiped_target"),
    ("spiped.smtp", "spiped_user=no-such-user-here", "does not exist"),
    ("spiped.smtp", "spiped_command=/nonexistent/spiped", "not executable"),
], ids=["bare-service", "bad-mode", "no-target", "no-user", "no-program"])
def test_openrc_checkconfig_rejects_bad_settings(tmp_path, rc_key, svcname, assignment, message):
    p = checkconfig(tmp_path, rc_key, assignment, svcname=svcname)
    assert p.returncode != 0
    assert message in p.stdout, p.stdout


def test_openrc_checkconfig_validates_the_key_file(tmp_path, rc_key):
    p = checkconfig(tmp_path, tmp_path / "missing.key")
    assert p.returncode != 0 and "does not exist" in p.stdout
    p = checkconfig(tmp_path, tmp_path)
    assert p.returncode != 0 and "not a regular file" in p.stdout
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")
    os.chmod(empty, 0o600)
    p = checkconfig(tmp_path, empty)
    assert p.returncode != 0 and "is empty" in p.stdout
    os.chmod(rc_key, 0o644)
    p = checkconfig(tmp_path, rc_key)
    assert p.returncode != 0 and "readable by everyone" in p.stdout
    os.chmod(rc_key, 0o600)
    short = tmp_path / "short.key"
    short.write_bytes(os.urandom(16))
    os.chmod(short, 0o600)
    p = checkconfig(tmp_path, short)
    assert p.returncode == 0 and "W key file" in p.stdout


def test_openrc_checkconfig_key_must_be_readable_by_the_service_user(tmp_path, rc_key):
    # The key belongs to the test's user, mode 0600; "nobody" can't read it.
    if os.getuid() == 65534:
        pytest.skip("the tests run as nobody")
    p = checkconfig(tmp_path, rc_key, "spiped_user=nobody")
    assert p.returncode != 0
    assert "not readable by user nobody" in p.stdout
    # With spiped_user=root spiped reads it as root and may drop with -u itself.
    p = checkconfig(tmp_path, rc_key, "spiped_user=root")
    assert p.returncode == 0, p.stdout


def test_openrc_checkconfig_runs_spiped_check(tmp_path, rc_key):
    """With our spiped as the command, checkconfig ends with its --check."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    spiped = write_exe(bindir / "spiped", '#!/bin/sh\nexec "%s" "%s" "$@"\n'
                       % (sys.executable, SPIPED_PY))
    good = ["spiped_source='%s'" % tcp_addr(free_port()), "spiped_command='%s'" % spiped]
    p = checkconfig(tmp_path, rc_key, "spiped_target='%s'" % tcp_addr(free_port()), *good)
    assert p.returncode == 0, p.stdout + p.stderr
    p = checkconfig(tmp_path, rc_key, "spiped_target='nosuch.invalid:80'", *good)
    assert p.returncode != 0 and "--check rejects this tunnel" in p.stdout
    assert "nosuch.invalid" in p.stderr
    p = checkconfig(tmp_path, rc_key, "spiped_target='%s'" % tcp_addr(free_port()),
                    "spiped_opts='--keepalive 0'", *good)
    assert p.returncode != 0 and "spiped: --keepalive: IDLE and INTERVAL must be" in p.stderr


def test_openrc_tunnels_check_the_config_before_start():
    text = open(os.path.join(OPENRC, "spiped-tunnels")).read()
    start_pre = text[text.index("start_pre() {"):]
    assert "--check --config \"$spiped_config\" -F" in start_pre[:start_pre.index("\n}")]


# ---------------------------------------------------------------- documentation

@pytest.mark.parametrize("folder", [DOCKER, SYSTEMD, OPENRC], ids=["docker", "systemd", "openrc"])
def test_each_folder_has_a_readme_naming_its_files(folder):
    with open(os.path.join(folder, "README.md")) as f:
        readme = f.read()
    for name in os.listdir(folder):
        if name != "README.md" and name != "Dockerfile":
            assert name in readme, "%s/README.md does not mention %s" % (folder, name)


def test_units_name_no_documentation_that_does_not_ship():
    # man:spiped(1) was named once; no man page ships with the project.
    for unit in (SERVICE, SOCKET):
        for ref in " ".join(unit_settings(unit).get("Documentation", [])).split():
            assert not ref.startswith("man:"), "%s names %s" % (unit, ref)


def test_service_start_limit_ends_a_broken_instance():
    """RestartSec= must fit StartLimitBurst= starts into StartLimitIntervalSec=
    (with 2 s and systemd's default 5 in 10 s, a broken instance restarted forever)."""
    s = unit_settings(SERVICE)
    seconds = lambda v: float(v[0].rstrip("s"))
    burst, interval, delay = int(s["StartLimitBurst"][0]), seconds(s["StartLimitIntervalSec"]), \
        seconds(s["RestartSec"])
    assert s["Restart"] == ["on-failure"]
    assert (burst - 1) * (delay + 1) < interval <= 60


def test_systemd_readme_says_instances_share_the_dynamic_user():
    with open(os.path.join(SYSTEMD, "README.md")) as f:
        readme = f.read()
    assert "transient" not in readme
    assert "every instance runs as the same user `spiped`" in readme


def readme_section(path, heading):
    """The text of the section of README PATH under HEADING (up to the next heading)."""
    with open(path) as f:
        text = f.read()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def test_docker_readme_podman_forms():
    section = readme_section(os.path.join(DOCKER, "README.md"), "## Podman")
    commands = [l.strip() for l in section.splitlines() if l.strip().startswith("podman ")]
    assert any(c.startswith("podman build --format docker ") for c in commands)
    assert not [c for c in commands if c.startswith("podman build") and "--format docker" not in c]
    with open(os.path.join(DOCKER, "README.md")) as f:
        for line in f:
            assert not ("podman" in line and "host-gateway" in line and "--add-host" not in line
                        and "does not know" not in line), line


def test_openrc_readme_debian_steps_make_conf_d():
    section = readme_section(os.path.join(OPENRC, "README.md"), "## Debian with OpenRC")
    lines = [l.strip() for l in section.splitlines()]
    mkdir = lines.index("install -d -m 0755 /etc/conf.d")
    assert mkdir < lines.index("install -m 0644 contrib/openrc/spiped.confd /etc/conf.d/spiped.smtp")


# ---------------------------------------------------------------- the integration tests' probe

REMOUNT_ERROR = "Error: remount /, flags: 0x44000: invalid argument"


@pytest.mark.parametrize("environment,outcome", [
    ({}, pytest.skip.Exception),
    ({"CI": "true"}, pytest.fail.Exception),
    ({"SPIPED_REQUIRE_INTEGRATION": "1"}, pytest.fail.Exception),
], ids=["skip", "CI=true", "SPIPED_REQUIRE_INTEGRATION=1"])
def test_integration_probe_failure_skips_unless_required(tmp_path, monkeypatch, environment, outcome):
    """An engine that cannot start a container (here, a stand-in printing the
    error podman gives in a chroot) makes its integration tests skip with the
    engine's first error line, or fail where they are required."""
    from test_integration import probe
    engine = write_exe(tmp_path / "podman", "#!/bin/sh\necho '%s' >&2\necho 'more detail' >&2\nexit 125\n"
                       % REMOUNT_ERROR)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("SPIPED_REQUIRE_INTEGRATION", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(outcome) as raised:
        probe("podman", [engine, "import", "tree.tar"])
    assert str(raised.value).startswith("podman cannot start a container here: " + REMOUNT_ERROR)
    assert "more detail" not in str(raised.value)
    with pytest.raises(outcome, match="systemd-nspawn cannot start a container here: exit 1"):
        probe("systemd-nspawn", ["false"])


def test_integration_probe_success_goes_on(monkeypatch):
    from test_integration import probe
    monkeypatch.setenv("CI", "true")
    assert probe("podman", ["true"]) is None
