#!/bin/sh
# Write a new spiped key: 32 random bytes in $SPIPED_KEY/spiped-keyfile
# (default /spiped/key/spiped-keyfile), mode 0600.
#
# An existing key is kept unless --force is given: replacing it breaks every
# tunnel whose other end still has the old one.  Run as root, the new file is
# handed to the image's "spiped" user so that "docker run --user spiped" can
# read it.
set -eu

usage() {
	echo "usage: spiped-generate-key.sh [--force]" >&2
	exit 1
}

force=
case $# in
0) ;;
1) [ "$1" = --force ] || usage; force=1 ;;
*) usage ;;
esac

umask 0077
dir=${SPIPED_KEY:-/spiped/key}
keyfile=$dir/spiped-keyfile

if [ -e "$dir" ] && [ ! -d "$dir" ]; then
	echo "spiped-generate-key.sh: $dir exists and is not a directory" >&2
	exit 1
fi
if [ -e "$keyfile" ] && [ -z "$force" ]; then
	echo "spiped-generate-key.sh: $keyfile already exists; use --force to replace it" >&2
	exit 1
fi

mkdir -p "$dir"
tmp=$keyfile.new.$$
trap 'rm -f "$tmp"' EXIT
dd if=/dev/urandom of="$tmp" bs=32 count=1 2>/dev/null
size=$(wc -c <"$tmp" | tr -d ' ')
if [ "$size" != 32 ]; then
	echo "spiped-generate-key.sh: read $size bytes from /dev/urandom, not 32" >&2
	exit 1
fi
if [ "$(id -u)" = 0 ] && id spiped >/dev/null 2>&1; then
	chown spiped:spiped "$tmp"
fi
mv -f "$tmp" "$keyfile"
trap - EXIT
echo "spiped-generate-key.sh: wrote $keyfile" >&2
