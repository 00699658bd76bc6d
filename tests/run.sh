#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run runs it too): on Debian or
# Ubuntu, as root or as a user with sudo, install the Debian packages the
# suite needs, make a virtual environment in .venv inside the checkout,
# install the project with its test extra into it, and run pytest from it.
# Arguments go to pytest (e.g. tests/test_cli.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=$(command -v sudo) || { echo "run.sh: needs root or sudo to install packages" >&2; exit 1; }
fi
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "$@"; }

apt_get update
# python3-venv: the venv (with pip); spiped: C spiped 1.6, the interop peer;
# the contrib/ checks run shellcheck and systemd-analyze (package systemd);
# procps: ps and pgrep, to look at daemons a failed run left behind.
# nginx-light: a PROXY-protocol server; tests/test_proxy.py runs instances of
# its own, so the package must not start (or leave) a system one.
# prometheus: promtool and a Prometheus of its own for tests/test_metrics.py;
# likewise no system one.  mandoc and groff-base: tests/test_man.py lints the
# manual pages with both.
# iproute2 and iptables: the network bed of tests/netbed.py (namespaces, veth
# links, tc, packet filters).
policy=/usr/sbin/policy-rc.d
own_policy=
if [ ! -e "$policy" ]; then
	own_policy=1
	trap '$SUDO rm -f "$policy"' EXIT
	printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy"
fi
apt_get install -y python3 python3-venv spiped shellcheck systemd procps nginx-light prometheus \
	mandoc groff-base iproute2 iptables
if [ -n "$own_policy" ]; then
	$SUDO rm -f "$policy"
	trap - EXIT
fi
if [ -s /run/nginx.pid ]; then
	$SUDO kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
if [ -s /run/prometheus/prometheus.pid ]; then
	$SUDO kill "$(cat /run/prometheus/prometheus.pid)" 2>/dev/null || true
fi
if [ -f tests/setup-integration.sh ]; then bash tests/setup-integration.sh; fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'

status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" = 5 ]; then
	echo "run.sh: pytest collected no tests" >&2
	status=1
fi
exit "$status"
