#!/usr/bin/env bash
# fresh-machine.sh -- do README's two commands work for a new user?
#
# Builds a minimal Debian 12 tree (debootstrap --variant=minbase bookworm),
# clones this checkout's HEAD into it under /root/spiped and /opt/spiped,
# and inside the tree (systemd-nspawn, sharing the host's network) runs,
# for each clone:
#   1. README's test command ("Run the tests"), verbatim: it must pass with
#      no failure and no error;
#   2. README's install-and-run lines ("Install and run"), verbatim, twice,
#      as a script under bash -e (a failing line stops it, as in a
#      new user's script);
#   3. an HTTP request to 127.0.0.1:8025 that must reach the small HTTP
#      server on 127.0.0.1:8080 this script starts;
# then stops everything it started, by PID.  Prints the wall time of
# each step.  Slow (the test suite runs twice); not part of the suite.
#
# Usage (as root, on a Debian host with the Debian archive and PyPI
# reachable, from the checkout):  bash tests/fresh-machine.sh [--cache]
#   --cache  keep the debootstrapped base tree in /var/tmp and reuse it
#            (default: a fresh one every run, removed at the end)
# Environment: MIRROR (default: the host's own Debian apt source).
# The tree gets the host's resolv.conf, Debian's usual /etc/hosts and, where the host has local CA
# certificates (a network that intercepts TLS), those and a pip.conf that
# trusts the system bundle: settings of the network, not of the project.
# Ports 8025, 8026 and 8080 on the host's loopback must be free.
set -euo pipefail

CACHE=
case "${1:-}" in
--cache) CACHE=/var/tmp/spiped-fresh-base ;;
"") ;;
*) echo "usage: $0 [--cache]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root (debootstrap, systemd-nspawn)" >&2; exit 1; }

REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
COMMIT=$(git -C "$REPO" rev-parse HEAD)
WORK=$(mktemp -d /var/tmp/spiped-fresh.XXXXXX)
TREE=$WORK/tree

host_mirror() {     # the host's Debian mirror: deb822 sources first, then sources.list
	awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true
}
MIRROR=${MIRROR:-$(host_mirror)}
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || { echo "$0: no Debian mirror found in the host's apt sources; set MIRROR" >&2; exit 1; }

# ------------------------------------------------------------------ helpers
T0=$(date +%s.%N)
step() {            # step "description" command...: run it, print its wall time
	local s e
	s=$(date +%s.%N)
	echo "==> $1"
	shift
	"$@"
	e=$(date +%s.%N)
	awk -v s="$s" -v e="$e" -v t="$T0" 'BEGIN { printf "    [%.1f s] (total %.0f s)\n", e - s, e - t }'
}

readme_block() {    # readme_block HEADING: the first ```sh block under "## HEADING"
	awk -v h="## $1" '
		$0 == h { under = 1; next }
		under && /^## / { exit }
		under && !inside && /^```sh$/ { inside = 1; next }
		inside && /^```$/ { exit }
		inside { print }' "$REPO/README.md"
}

cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# ------------------------------------------------------------------ host side
TEST_CMD=$(readme_block "Run the tests")
RUN_CMD=$(readme_block "Install and run")
if [ -z "$TEST_CMD" ] || [ -z "$RUN_CMD" ]; then echo "$0: README blocks not found" >&2; exit 1; fi
printf 'README test command:\n%s\nREADME install-and-run lines:\n%s\n' "$TEST_CMD" "$RUN_CMD" | sed 's/^/    /'
echo "    checkout $REPO at $COMMIT, mirror $MIRROR"

host_packages() {
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >/dev/null
}

make_tree() {
	if [ -n "$CACHE" ] && [ -f "$CACHE/.complete" ]; then
		echo "    copying the cached base tree $CACHE"
		cp -a "$CACHE" "$TREE"
		rm -f "$TREE/.complete"
		return
	fi
	debootstrap --variant=minbase bookworm "$TREE" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
		{ tail -20 "$WORK/debootstrap.log"; return 1; }
	# the host's apt sources (main, updates, security), as an image would have them
	rm -f "$TREE/etc/apt/sources.list"
	mkdir -p "$TREE/etc/apt/sources.list.d"
	if [ -f /etc/apt/sources.list.d/debian.sources ]; then
		cp /etc/apt/sources.list.d/debian.sources "$TREE/etc/apt/sources.list.d/"
	else
		cp /etc/apt/sources.list "$TREE/etc/apt/sources.list"
	fi
	rm -rf "$TREE"/var/cache/apt/archives/*.deb "$TREE"/var/lib/apt/lists/*
	if [ -n "$CACHE" ]; then
		rm -rf "$CACHE"
		cp -a "$TREE" "$CACHE"
		touch "$CACHE/.complete"
	fi
}

clone_into_tree() {     # git is the host's; the tree gets plain clones of HEAD
	local dest
	for dest in root/spiped opt/spiped; do
		git clone -q --no-hardlinks "$REPO" "$TREE/$dest"
		git -C "$TREE/$dest" checkout -q "$COMMIT"
	done
	chmod 0700 "$TREE/root"
}

host_network() {    # what any machine on this network has: DNS and, if any, local CAs
	cp /etc/resolv.conf "$TREE/etc/resolv.conf"
	# debootstrap writes no /etc/hosts; installers and container runtimes
	# do, and the suite resolves "localhost".  Debian's usual one:
	[ -f "$TREE/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$TREE/etc/hosts"
	# A network that intercepts TLS needs its CA on every machine; pip
	# trusts only its own bundle unless told to use the system's.
	if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
		mkdir -p "$TREE/usr/local/share/ca-certificates"
		cp /usr/local/share/ca-certificates/*.crt "$TREE/usr/local/share/ca-certificates/"
		printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$TREE/etc/pip.conf"
		echo "    copied the host's local CA certificates; /etc/pip.conf uses the system bundle"
	fi
	stat -c '    %A %n' "$TREE/root" "$TREE/root/spiped" "$TREE/opt/spiped"
}

ports_free() {      # the README's ports are the host's too (the tree shares its network)
	python3 - <<'PY'
import socket, sys
busy = []
for port in (8025, 8026, 8080):
    s = socket.socket()
    busy += [port] if s.connect_ex(("127.0.0.1", port)) == 0 else []
    s.close()
print("    busy ports on 127.0.0.1:", busy or "none")
sys.exit(1 if busy else 0)
PY
}
step "host: 127.0.0.1 ports 8025, 8026 and 8080 are free" ports_free
step "host: apt-get install debootstrap systemd-container" host_packages
step "debootstrap --variant=minbase bookworm${CACHE:+ (cache $CACHE)}" make_tree
step "git clone $COMMIT into /root/spiped and /opt/spiped of the tree" clone_into_tree
step "network settings: resolv.conf, /etc/hosts, the host's local CAs" host_network

# ------------------------------------------------------------------ in the tree
# One container per clone: the daemons the README starts live as long as
# the container, so both runs, the request and the stop happen in it.
printf '%s\n' "$TEST_CMD" >"$TREE/test-command.sh"
printf '%s\n' "$RUN_CMD" >"$TREE/install-and-run.sh"
cat >"$TREE/check.sh" <<'EOF'
# check.sh DIR: README's commands in the clone DIR (inside the fresh tree)
set -uo pipefail
dir=$1
T0=$(date +%s.%N)
step() {
	local s e rc
	s=$(date +%s.%N)
	echo "==> [$dir] $1"
	shift
	"$@"
	rc=$?
	e=$(date +%s.%N)
	awk -v s="$s" -v e="$e" -v t="$T0" 'BEGIN { printf "    [%.1f s] (total %.0f s)\n", e - s, e - t }'
	[ "$rc" = 0 ] || { echo "    FAILED (exit $rc)"; stop_all; exit 1; }
}
SERVER=
stop_all() {        # what this check started: the HTTP server and the daemons
	local f p
	[ -z "$SERVER" ] || { kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; }
	SERVER=
	for f in "$dir/[127.0.0.1]:8025.pid" "$dir/[127.0.0.1]:8026.pid"; do
		[ -f "$f" ] || continue
		p=$(cat "$f")
		if grep -q spiped.py "/proc/$p/cmdline" 2>/dev/null; then
			kill "$p"
			for _ in $(seq 1 100); do grep -q spiped.py "/proc/$p/cmdline" 2>/dev/null || break; sleep 0.1; done
			echo "    stopped spiped PID $p ($(basename "$f"))"
		fi
	done
	return 0
}
test_command() {
	bash /test-command.sh </dev/null 2>&1 | tee /tmp/test-output
	local rc=${PIPESTATUS[0]} summary
	summary=$(grep -E '[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' /tmp/test-output | tail -1)
	echo "    summary: $summary"
	[ "$rc" = 0 ] || return "$rc"
	case "$summary" in *failed* | *error*) return 1 ;; esac
	[ -n "$summary" ]
}
install_and_run() {
	bash -e /install-and-run.sh </dev/null
	local rc=$?
	ls "$dir" | grep -E '\.pid$|^keyfile$' | sed 's/^/    /'
	return "$rc"
}
start_http() {
	mkdir -p /tmp/www
	head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >/tmp/www/token
	(cd /tmp/www && exec python3 -m http.server 8080 --bind 127.0.0.1 >/tmp/http.log 2>&1) &
	SERVER=$!
	python3 - <<'PY'
import socket, time
deadline = time.monotonic() + 20
while True:
    try:
        socket.create_connection(("127.0.0.1", 8080), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
PY
}
request() {
	python3 - <<'PY'
import urllib.request
want = open("/tmp/www/token").read()
got = urllib.request.urlopen("http://127.0.0.1:8025/token", timeout=30).read().decode()
print("    GET http://127.0.0.1:8025/token ->", got, "(expected %s)" % want)
raise SystemExit(0 if got == want else 1)
PY
}
cd "$dir"
step "README test command: $(head -1 /test-command.sh)" test_command
step "README install-and-run, first time" install_and_run
step "README install-and-run, second time" install_and_run
step "python3 -m http.server 8080 (PID in \$SERVER)" start_http
step "HTTP request through 127.0.0.1:8025 -> 8026 -> 8080" request
step "stop the HTTP server and both daemons by PID" stop_all
EOF

in_tree() {         # in_tree DIR: check.sh in a container on the fresh tree
	systemd-nspawn --register=no --keep-unit --as-pid2 -q -D "$TREE" \
		--setenv=HOME=/root bash /check.sh "$1" </dev/null
}

step "in the tree, /root/spiped: test command, install-and-run twice, request" in_tree /root/spiped
step "in the tree, /opt/spiped: test command, install-and-run twice, request" in_tree /opt/spiped
awk -v s="$T0" -v e="$(date +%s.%N)" 'BEGIN { printf "==> fresh-machine check passed in %.0f s\n", e - s }'
