"""contrib/kubernetes/ and contrib/docker/compose.yaml, read without a cluster.

Every manifest passes `kubernetes-validate --strict` (the schemas ship with
the package, so no network: it runs in an empty network namespace where it
can) for the Kubernetes version pinned below, and the pods follow what the
README promises: the restricted Pod Security profile with the image's uid,
the key from a Secret folder (no subPath) with --watch, probes on the
metrics port, a drain shorter than the grace period.  The manifests and the
compose file run for real under podman in tests/test_integration.py.
"""
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT, read_text, unavailable

KUBERNETES = os.path.join(ROOT, "contrib", "kubernetes")
COMPOSE = os.path.join(ROOT, "contrib", "docker", "compose.yaml")
DOCKERFILE = os.path.join(ROOT, "contrib", "docker", "Dockerfile")
KUBERNETES_VERSION = "1.31.0"   # what the manifests are checked against
MANIFESTS = sorted(os.path.join(KUBERNETES, f) for f in os.listdir(KUBERNETES) if f.endswith(".yaml"))


def need_yaml():
    """The yaml module (PyYAML, which kubernetes-validate brings), or unavailable()."""
    try:
        import yaml
    except ImportError:
        unavailable("PyYAML is not installed (pip install -e '.[test]')")
    return yaml


def documents(path):
    return [d for d in need_yaml().safe_load_all(read_text(path)) if d]


def pod_specs():
    """(file, Deployment name, its pod template spec) of every Deployment."""
    return [(os.path.basename(path), d["metadata"]["name"], d["spec"]["template"]["spec"])
            for path in MANIFESTS for d in documents(path) if d["kind"] == "Deployment"]


def spiped_containers():
    return [(name, spec, c) for _, name, spec in pod_specs() for c in spec["containers"]
            if c["name"] == "spiped"]


def option(args, name):
    """The value after NAME in ARGS, or None."""
    return args[args.index(name) + 1] if name in args else None


def image_uid():
    """The uid and gid the Dockerfile gives the spiped user."""
    text = read_text(DOCKERFILE)
    uid = re.search(r"useradd [^;]*--uid (\d+)", text)
    gid = re.search(r"groupadd [^;]*--gid (\d+)", text)
    assert uid and gid, "the Dockerfile must fix the spiped user's uid and gid"
    return int(uid.group(1)), int(gid.group(1))


def offline_works():
    """True where `unshare -n` can run a command with no network (root, and allowed here)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0


def test_every_manifest_passes_kubernetes_validate_strict():
    here = os.path.dirname(sys.executable)
    tool = shutil.which("kubernetes-validate", path=here + os.pathsep + os.environ.get("PATH", ""))
    if tool is None:
        unavailable("kubernetes-validate is not installed (pip install -e '.[test]')")
    assert len(MANIFESTS) >= 3, MANIFESTS
    cmd = [tool, "--strict", "-k", KUBERNETES_VERSION, *MANIFESTS]
    if offline_works():
        cmd = ["unshare", "-n", *cmd]             # offline: no network at all
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    kinds = {(d["kind"], d["metadata"]["name"]) for path in MANIFESTS for d in documents(path)}
    assert {"Deployment", "Service", "NetworkPolicy"} <= {k for k, _ in kinds}, kinds
    for _, name in kinds:                         # every resource was looked at
        assert re.search(r"passed for resource \w+/%s against version" % re.escape(name),
                         p.stdout + p.stderr), (name, p.stdout + p.stderr)


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    """The check above is worth something: a misspelt field fails it."""
    here = os.path.dirname(sys.executable)
    tool = shutil.which("kubernetes-validate", path=here + os.pathsep + os.environ.get("PATH", ""))
    if tool is None:
        unavailable("kubernetes-validate is not installed (pip install -e '.[test]')")
    bad = tmp_path / "bad.yaml"
    bad.write_text(read_text(os.path.join(KUBERNETES, "decrypt.yaml"))
                   .replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:", 1))
    p = subprocess.run([tool, "--strict", "-k", KUBERNETES_VERSION, str(bad)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "readOnlyRootFileSystem" in p.stdout + p.stderr


def test_pods_follow_the_restricted_profile_with_the_images_uid():
    uid, gid = image_uid()
    assert (uid, gid) == (999, 999)               # what the first builds gave; never change it
    specs = pod_specs()
    assert {name for _, name, _ in specs} == {"app", "spiped-elasticsearch"}
    for _, name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid, name
        assert pod["runAsGroup"] == gid and pod["fsGroup"] == gid, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                          "capabilities": {"drop": ["ALL"]}}, (name, c["name"])
        for volume in spec.get("volumes", []):    # restricted allows no hostPath
            assert set(volume) <= {"name", "secret", "configMap", "emptyDir", "projected"}, volume


def test_key_from_a_secret_folder_with_watch():
    for name, spec, c in spiped_containers():
        args = c["args"]
        assert "--watch" in args, name
        assert "-k" not in args, "the entry point gives -k /spiped/key/spiped-keyfile"
        mount = [m for m in c["volumeMounts"] if m["mountPath"] == "/spiped/key"]
        assert len(mount) == 1 and mount[0].get("readOnly") is True, name
        assert "subPath" not in mount[0], "a subPath mount is never updated"
        volume = [v for v in spec["volumes"] if v["name"] == mount[0]["name"]][0]
        assert volume["secret"]["secretName"] == "spiped-key", name
        assert volume["secret"]["defaultMode"] == 0o440, name
        for path in [option(args, "--accept-key")] if "--accept-key" in args else []:
            assert path.startswith("/spiped/key/"), path


def test_probes_use_the_metrics_port_and_drain_fits_the_grace_period():
    for name, spec, c in spiped_containers():
        args = c["args"]
        metrics = option(args, "--metrics")
        port = int(metrics.rsplit(":", 1)[1])
        assert metrics.startswith("[0.0.0.0]:"), "the kubelet probes the pod's address"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == port
        source_port = int(option(args, "-s").rsplit(":", 1)[1])
        assert source_port != port                 # a probe never takes an -n slot
        ready, live = c["readinessProbe"], c["livenessProbe"]
        assert ready["httpGet"] == {"path": "/healthz", "port": "metrics"}, name
        assert live == dict(live, tcpSocket={"port": "metrics"}) and "httpGet" not in live, name
        drain = float(option(args, "--drain-timeout"))
        assert drain < spec["terminationGracePeriodSeconds"], name
        annotations = [d["spec"]["template"]["metadata"]["annotations"] for path in MANIFESTS
                       for d in documents(path)
                       if d["kind"] == "Deployment" and d["metadata"]["name"] == name][0]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                               "prometheus.io/path": "/metrics"}, name


def test_the_sidecar_speaks_plaintext_on_loopback_only():
    (_, _, spec), = [s for s in pod_specs() if s[1] == "app"]
    spiped = [c for c in spec["containers"] if c["name"] == "spiped"][0]
    args = spiped["args"]
    assert "-e" in args and option(args, "-s").startswith("[127.0.0.1]:")
    decrypt = [d for d in documents(os.path.join(KUBERNETES, "decrypt.yaml"))]
    service = [d for d in decrypt if d["kind"] == "Service"][0]
    assert option(args, "-t") == "%s:%d" % (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    (_, _, dspec), = [s for s in pod_specs() if s[1] == "spiped-elasticsearch"]
    dargs = dspec["containers"][0]["args"]
    assert "-d" in dargs and option(dargs, "-t") == "elasticsearch:9200"  # the image page's example


def test_network_policies_select_the_pods_of_the_manifests():
    policies = documents(os.path.join(KUBERNETES, "networkpolicy.yaml"))
    labels = [d["spec"]["template"]["metadata"]["labels"] for path in MANIFESTS
              for d in documents(path) if d["kind"] == "Deployment"]
    spiped_policy = [p for p in policies if p["metadata"]["name"] == "spiped-elasticsearch"][0]
    selector = spiped_policy["spec"]["podSelector"]["matchLabels"]
    assert any(selector.items() <= l.items() for l in labels), selector
    ports = {p["port"] for rule in spiped_policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {9200, 9100}


def test_readme_names_its_files_and_the_secret_and_test_commands():
    readme = read_text(os.path.join(KUBERNETES, "README.md"))
    for path in MANIFESTS:
        assert os.path.basename(path) in readme, path
    assert "kubectl create secret generic spiped-key" in readme
    assert "--from-file=spiped-keyfile=" in readme and "--from-file=previous=" in readme
    assert "subPath" in readme and "--watch" in readme
    top = read_text(os.path.join(ROOT, "README.md"))
    assert "contrib/kubernetes/" in top and "contrib/docker/compose.yaml" in top


def test_compose_file_is_the_image_pages_example():
    compose = documents(COMPOSE)[0]
    spiped = compose["services"]["spiped"]
    assert spiped["user"] == "spiped"
    assert spiped["command"][:5] == ["-d", "-s", "[0.0.0.0]:9200", "-t", "elasticsearch:9200"]
    assert "elasticsearch" in compose["services"]
    assert spiped["volumes"] == ["./key:/spiped/key:ro"]
    assert spiped["ports"] == ["9200:9200"]
    assert spiped["build"] == {"context": "../..", "dockerfile": "contrib/docker/Dockerfile"}
    assert "compose.yaml" in read_text(os.path.join(ROOT, "contrib", "docker", "README.md"))
