#!/usr/bin/env python3
"""spiped-keygen: make a new key file for spiped and spipe.

    spiped-keygen [--force] <key file>   write 32 random bytes, mode 0600
    spiped-keygen -                      write 32 random bytes to stdout

The bytes come from the operating system's generator. The file is created
with mode 0600 in the same call that creates it, so there is no moment at
which another user could open it. An existing file is never touched unless
--force is given; then the new key goes into a private temporary file in
the same directory, which is renamed over the old one, so the path always
holds either the old key or the whole new one.
"""
import os
import secrets
import sys
import tempfile

PROG = "spiped-keygen"
KEY_BYTES = 32
MODE = 0o600

USAGE = """\
usage: spiped-keygen [--force] <key file>
       spiped-keygen -
       spiped-keygen --help
"""

OPTIONS = """\
  --force                replace an existing key file (a new file is renamed
                         over it)
  -h, --help             print this help and exit
"""


class KeygenError(Exception):
    """A failure to report on one line, exit status 1."""


def write_all(fd, data):
    """Write all of DATA to file descriptor FD."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fill(fd, key):
    """Make FD mode 0600 whatever the umask did, write KEY and flush it to disk."""
    os.fchmod(fd, MODE)
    write_all(fd, key)
    os.fsync(fd)


def create_new(path, key):
    """Create PATH, which must not exist yet, holding KEY."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, MODE)
    except FileExistsError:
        raise KeygenError("%s already exists; use --force to replace it" % path)
    except OSError as e:
        raise KeygenError("cannot create %s: %s" % (path, e.strerror))
    try:
        fill(fd, key)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise KeygenError("cannot write %s: %s" % (path, e.strerror))
    os.close(fd)


def replace(path, key):
    """Put KEY at PATH, replacing any file there in one rename."""
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=".spiped-keygen-", dir=directory)
    except OSError as e:
        raise KeygenError("cannot create a file in %s: %s" % (directory, e.strerror))
    try:
        try:
            fill(fd, key)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise KeygenError("cannot write %s: %s" % (path, e.strerror))


def to_stdout(key):
    """Write KEY, raw, to standard output."""
    try:
        sys.stdout.buffer.write(key)
        sys.stdout.buffer.flush()
    except OSError as e:
        raise KeygenError("cannot write to standard output: %s" % (e.strerror or e))


def parse_args(argv):
    """(path, force) from ARGV; None for --help; ValueError on bad usage."""
    force = False
    paths = []
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            return None
        if arg == "--force":
            force = True
        elif arg == "--":
            paths.extend(args)
        elif arg.startswith("-") and arg != "-":
            raise ValueError("unknown option: %s" % arg)
        else:
            paths.append(arg)
    if len(paths) != 1:
        raise ValueError("expected one key file, got %d" % len(paths))
    if paths[0] == "":
        raise ValueError("empty key file name")
    return paths[0], force


def main(argv=None):
    """Run spiped-keygen with ARGV (default sys.argv[1:]); return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        parsed = parse_args(argv)
    except ValueError as e:
        sys.stderr.write("%s: %s\n%s" % (PROG, e, USAGE))
        return 1
    if parsed is None:
        sys.stdout.write(__doc__.split("\n\n", 1)[0] + "\n\n" + USAGE + "\n" + OPTIONS)
        return 0
    path, force = parsed
    key = secrets.token_bytes(KEY_BYTES)
    try:
        if path == "-":
            to_stdout(key)
        elif force:
            replace(path, key)
        else:
            create_new(path, key)
    except KeygenError as e:
        sys.stderr.write("%s: %s\n" % (PROG, e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
