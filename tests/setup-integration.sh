#!/usr/bin/env bash
# Installs and configures what tests/test_integration.py needs: podman (with
# the configuration a host without systemd and with hybrid cgroups needs),
# podman-compose (contrib/docker/compose.yaml), debootstrap and
# systemd-nspawn.  Idempotent; run as root.  Without root it
# says why and exits 0, and the integration tests then skip.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
	echo "setup-integration.sh: not root; the integration tests will skip" >&2
	exit 0
fi

if [ "${container:-}" = systemd-nspawn ] ||
	[ "$(cat /run/host/container-manager 2>/dev/null)" = systemd-nspawn ]; then
	echo "setup-integration.sh: inside a systemd-nspawn container; the integration tests will skip" >&2
	exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Another apt-get may hold the lock for a while; wait for it.
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
	podman podman-compose runc conmon netavark aardvark-dns containernetworking-plugins \
	iptables catatonit uidmap golang-github-containers-common \
	debootstrap systemd-container >/dev/null

# podman's configuration.  Written only when absent or written by this
# script earlier (marked by its first line), so a host's own is kept.
MARK="# written by spiped tests/setup-integration.sh"
ours_or_absent() { [ ! -e "$1" ] || [ "$(head -n 1 "$1")" = "$MARK" ]; }
mkdir -p /etc/containers

# vfs storage needs neither overlayfs nor fuse.
if ours_or_absent /etc/containers/storage.conf; then
	cat >/etc/containers/storage.conf <<CONF
$MARK
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF
fi

# runc and cgroupfs: crun refuses hybrid cgroups, and there may be no systemd
# to manage cgroups.  Explicit ulimits: without CAP_SYS_RESOURCE the runtime
# cannot raise limits above the current hard limit (nproc 32768 is accepted
# where podman's default is not).
if ours_or_absent /etc/containers/containers.conf; then
	nofile=$(ulimit -Hn)
	cat >/etc/containers/containers.conf <<CONF
$MARK
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
CONF
fi

podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}} cgroups {{.Host.CgroupsVersion}}' ||
	echo "setup-integration.sh: podman info failed; the image tests will say why" >&2
