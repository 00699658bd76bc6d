#!/bin/sh
# Entry point of the spiped image.
#
# When the first argument is an option (starts with "-"), run
#   spiped -k KEY -F "$@"   (or spiped -F "$@" when it is --config FILE)
# in the foreground as this process (exec, so spiped is PID 1 and receives
# the container's signals itself).  Any other first argument is a command to
# run as given, e.g. "spiped-generate-key.sh", "spipe ...", "sh".
#
# KEY is $SPIPED_KEY (default /spiped/key).  It may be the key file itself
# (the usual bind mount) or a directory holding "spiped-keyfile" (what
# spiped-generate-key.sh makes); in the second case that file is used.
set -eu

key=${SPIPED_KEY:-/spiped/key}

case ${1-} in
--config | --config=*)
	# Every tunnel of a configuration file; its lines name their own keys.
	exec spiped -F "$@"
	;;
-*)
	if [ -d "$key" ]; then
		if [ -f "$key/spiped-keyfile" ]; then
			key=$key/spiped-keyfile
		else
			echo "docker-entrypoint.sh: $key is a directory without spiped-keyfile in it;" \
				"run spiped-generate-key.sh or mount your key file at $key" >&2
		fi
	fi
	exec spiped -k "$key" -F "$@"
	;;
esac

exec "$@"
