"""Command-line parity with the C programs: wrong command lines, edge values
that are accepted, start-up order, and dropping privileges with -u.

Every case in the tables runs twice: against the installed C binaries
(whose behaviour, recorded below, was observed with spiped 1.6.2) and
against spiped.py. A case says what C does and, where 1.6.4 differs from
1.6.2 (SPEC §9), what ours must do instead.

Checked for a failing command line: the exit status, stdout empty, the
message lines before the usage text (exactly), and whether usage is
printed. Our usage text must equal the 1.6.4 text; C's need only start
with "usage:", since 1.6.2 lacks -b.

Commands that would daemonize carry -F, except the pidfile cases, which
fail before the parent can leave. Every run has a timeout, so a case that
unexpectedly starts a daemon fails instead of hanging, and any pidfile left
in the scratch directory is used to kill what it names.
"""
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest

from conftest import (
    C_SPIPE,
    C_SPIPED,
    REAL_PYTHON,
    SPIPED_PY,
    address_listening,
    free_port,
    have_ipv6,
    need_c,
    pid_gone,
    proc_ids,
    tcp_addr,
    wait_for,
)

RUN_TIMEOUT = 10

USAGE_SPIPED = """\
usage: spiped {-e | -d} -s <source socket> -t <target socket> -k <key file>
    [-b <bind address> [-DFj] [-f | -g] [-n <max # connections>]
    [-o <connection timeout>] [-p <pidfile>] [-r <rtime> | -R] [--syslog]
    [-u {<username> | <:groupname> | <username:groupname>}]
       spiped -v
"""

USAGE_SPIPE = """\
usage: spipe -t <target socket> -k <key file> [-b <bind address>] [-f | -g]
    [-j] [-o <connection timeout>]
       spipe -v
"""

USAGE = {"spiped": USAGE_SPIPED, "spipe": USAGE_SPIPE}
USAGE_START = {"spiped": "usage: spiped {-e | -d}", "spipe": "usage: spipe -t"}

# gai_strerror texts a failed look-up of a .invalid name may produce.
DNS_FAIL = (r"(Name or service not known|Temporary failure in name resolution"
            r"|No address associated with hostname)")


# ---------------------------------------------------------------------------
# What a case expects

@dataclass(frozen=True)
class Fails:
    """Exits with RC; LINES are the messages before any usage text.

    A line is a string (after placeholder substitution, compared exactly) or
    a compiled pattern (full match). Lines matching EXTRA are dropped before
    comparing, for messages that may or may not appear (racy threads).
    LINES None: only the exit status is checked.
    """
    lines: tuple = ()
    usage: bool = False
    rc: int = 1
    extra: object = None


@dataclass(frozen=True)
class Starts:
    """Accepted: the process (run with -F) ends up listening on ADDR."""
    addr: str = "{src}"


@dataclass(frozen=True)
class Version:
    """Prints "<prog> <version>" to stderr and exits 0."""


USAGE_ONLY = Fails(usage=True)
# Where C 1.6.2 and 1.6.4 differ, C is held to the exit status only.
C_FAILS = Fails(lines=None)


def illegal(prog, opt):
    return Fails(("%s: illegal option -- %s" % (prog, opt),), usage=True)


def missing_arg(prog, opt):
    return Fails(("%s: Missing argument to %s" % (prog, opt),), usage=True)


def bad_number(prog, opt, arg, why):
    return Fails(("%s: Error parsing argument: %s %s: %s" % (prog, opt, arg, why),))


def invalid(opt, arg, prog="spiped"):
    return bad_number(prog, opt, arg, "Invalid argument")


def out_of_range(opt, arg, prog="spiped"):
    return bad_number(prog, opt, arg, "Numerical result out of range")


def unresolvable(addr, first, prog="spiped"):
    return Fails((first if isinstance(first, re.Pattern) else "%s: %s" % (prog, first),
                  "%s: Error resolving socket address: %s" % (prog, addr)))


def drop_failed(first):
    return Fails(("spiped: " + first, "spiped: Failed to drop privileges"))


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple
    c: object
    ours: object = None  # None: same as c
    prog: str = "spiped"

    def expect(self, impl):
        if impl == "ours" and self.ours is not None:
            return self.ours
        return self.c


# A valid spiped command line in the foreground; cases add to it or vary it.
S, T, K = ("-s", "{src}"), ("-t", "{tgt}"), ("-k", "{key}")
BASE = ("-e", "-F") + S + T + K


def base(*more):
    return BASE + more


def bad_target(name, target, why):
    """Case NAME: -t TARGET fails with WHY, then spiped's "Error resolving" line."""
    return Case(name, ("-e", "-F") + S + ("-t", target) + K, unresolvable(target, why))


# ---------------------------------------------------------------------------
# spiped: command lines

SPIPED_CASES = [
    # Usage errors without a message.
    Case("no-args", (), USAGE_ONLY),
    Case("both-e-and-d", ("-e", "-d", "-F") + S + T + K, USAGE_ONLY),
    Case("neither-e-nor-d", ("-F",) + S + T + K, USAGE_ONLY),
    Case("no-s", ("-e", "-F") + T + K, USAGE_ONLY),
    Case("no-t", ("-e", "-F") + S + K, USAGE_ONLY),
    Case("no-k", ("-e", "-F") + S + T, USAGE_ONLY),
    Case("f-and-g", base("-f", "-g"), USAGE_ONLY),
    Case("r-5-with-R", base("-r", "5", "-R"), USAGE_ONLY),
    Case("R-with-r-5", base("-R", "-r", "5"), USAGE_ONLY),
    Case("r-nan-with-R", base("-r", "nan", "-R"), USAGE_ONLY),
    Case("o-nan", base("-o", "nan"), USAGE_ONLY),
    Case("o-NaN", base("-o", "NaN"), USAGE_ONLY),
    # Each option at most once.
    Case("repeat-e", ("-e",) + BASE, USAGE_ONLY),
    Case("repeat-d-after-d", ("-d", "-F") + S + T + K + ("-d",), USAGE_ONLY),
    Case("e-after-d", ("-d", "-F") + S + T + K + ("-e",), USAGE_ONLY),
    Case("repeat-k", base("-k", "{key}"), USAGE_ONLY),
    Case("repeat-s", base("-s", "{src}"), USAGE_ONLY),
    Case("repeat-t", base("-t", "{tgt}"), USAGE_ONLY),
    Case("repeat-F", base("-F"), USAGE_ONLY),
    Case("repeat-D", base("-D", "-D"), USAGE_ONLY),
    Case("repeat-f", base("-f", "-f"), USAGE_ONLY),
    Case("repeat-g", base("-g", "-g"), USAGE_ONLY),
    Case("repeat-j-grouped", base("-jj"), USAGE_ONLY),
    Case("repeat-R", base("-R", "-R"), USAGE_ONLY),
    Case("repeat-o", base("-o", "1", "-o", "2"), USAGE_ONLY),
    Case("repeat-o-zero", base("-o", "0", "-o", "0"), USAGE_ONLY),
    Case("repeat-n-zero", base("-n", "0", "-n", "0"), USAGE_ONLY),
    Case("repeat-r", base("-r", "1", "-r", "1"), USAGE_ONLY),
    Case("repeat-p", base("-p", "{tmp}/a.pid", "-p", "{tmp}/a.pid"), USAGE_ONLY),
    Case("repeat-u", base("-u", "nobody", "-u", "nobody"), USAGE_ONLY),
    Case("repeat-syslog", base("--syslog", "--syslog"), USAGE_ONLY),
    # "-syslog" is -s with the argument "yslog": a second -s.
    Case("single-dash-syslog", base("-syslog"), USAGE_ONLY),
    # In "-ex" the repeated -e is seen before the x.
    Case("repeat-in-group", base("-ex"), USAGE_ONLY),
    # Arguments left over.
    Case("stray-argument", base("extra"), USAGE_ONLY),
    Case("stray-in-middle", ("-e", "-F") + S + ("extra",) + T + K, USAGE_ONLY),
    Case("stray-lone-dash", base("-"), USAGE_ONLY),
    Case("stray-after-double-dash", base("--", "extra"), USAGE_ONLY),
    Case("double-dash-ends-options", ("-e", "-F") + S + T + ("--",) + K, USAGE_ONLY),
    Case("double-dash-alone", ("--",), USAGE_ONLY),
    # -s takes "-t" as its argument; then -t is missing.
    Case("s-swallows-t", ("-e", "-s", "-t"), USAGE_ONLY),
    # Illegal options: printed with the dash.
    Case("illegal-option", ("-x",), illegal("spiped", "-x")),
    Case("illegal-option-late", base("-X"), illegal("spiped", "-X")),
    Case("illegal-in-group", ("-Fx",), illegal("spiped", "-x")),
    Case("syslog-with-value", base("--syslog=1"), illegal("spiped", "--syslog")),
    Case("syslog-prefix", base("--sys"), illegal("spiped", "--sys")),
    Case("long-option", ("--foo",), illegal("spiped", "--foo")),
    # -b is 1.6.3+; ours follows 1.6.4 and accepts it.
    # 1.6.2: "spiped: illegal option -- -b" + usage.
    Case("b-bind-address", base("-b", "[127.0.0.1]"), C_FAILS, ours=Starts()),
    # Missing option arguments.
    Case("k-without-argument", ("-e", "-F") + S + T + ("-k",), missing_arg("spiped", "-k")),
    Case("k-only", ("-k",), missing_arg("spiped", "-k")),
    Case("k-in-group", ("-ek",), missing_arg("spiped", "-k")),
    Case("s-without-argument", ("-e", "-s"), missing_arg("spiped", "-s")),
    Case("t-without-argument", ("-e", "-F") + S + K + ("-t",), missing_arg("spiped", "-t")),
    Case("o-without-argument", base("-o"), missing_arg("spiped", "-o")),
    Case("n-without-argument", base("-n"), missing_arg("spiped", "-n")),
    Case("r-without-argument", base("-r"), missing_arg("spiped", "-r")),
    Case("p-without-argument", base("-p"), missing_arg("spiped", "-p")),
    Case("u-without-argument", base("-u"), missing_arg("spiped", "-u")),
    # Numbers: -o (strtod).
    Case("o-not-a-number", base("-o", "abc"), invalid("-o", "abc")),
    Case("o-empty", base("-o", ""), invalid("-o", "")),
    Case("o-trailing-space", base("-o", "5 "), invalid("-o", "5 ")),
    Case("o-negative", base("-o", "-1"), out_of_range("-o", "-1")),
    Case("o-negative-fraction", base("-o", "-0.5"), out_of_range("-o", "-0.5")),
    Case("o-minus-inf", base("-o", "-inf"), out_of_range("-o", "-inf")),
    Case("o-overflow", base("-o", "1e400"), out_of_range("-o", "1e400")),
    Case("o-underflow", base("-o", "1e-400"), out_of_range("-o", "1e-400")),
    # Numbers: -n (unsigned, base auto-detected).
    Case("n-not-a-number", base("-n", "abc"), invalid("-n", "abc")),
    Case("n-empty", base("-n", ""), invalid("-n", "")),
    Case("n-trailing-junk", base("-n", "12x"), invalid("-n", "12x")),
    Case("n-fraction", base("-n", "1.5"), invalid("-n", "1.5")),
    Case("n-exponent", base("-n", "5e3"), invalid("-n", "5e3")),
    Case("n-bad-octal", base("-n", "08"), invalid("-n", "08")),
    Case("n-bare-0x", base("-n", "0x"), invalid("-n", "0x")),
    Case("n-negative-junk", base("-n", "-1x"), invalid("-n", "-1x")),
    Case("n-overflow", base("-n", "18446744073709551616"), out_of_range("-n", "18446744073709551616")),
    Case("n-overflow-huge", base("-n", "99999999999999999999999"),
         out_of_range("-n", "99999999999999999999999")),
    Case("n-negative-overflow", base("-n", "-18446744073709551616"),
         out_of_range("-n", "-18446744073709551616")),
    # Numbers: -r (strtod).
    Case("r-not-a-number", base("-r", "abc"), invalid("-r", "abc")),
    Case("r-negative", base("-r", "-1"), out_of_range("-r", "-1")),
    Case("r-overflow", base("-r", "1e400"), out_of_range("-r", "1e400")),
    # -v: options are handled left to right; -v exits where it stands.
    Case("version", ("-v",), Version()),
    Case("version-in-group", ("-eFv",), Version()),
    Case("version-after-valid-line", base("-v"), Version()),
    Case("version-before-bad-number", ("-v", "-o", "abc"), Version()),
    Case("version-before-repeat", ("-e", "-v", "-e"), Version()),
    Case("version-twice", ("-v", "-v"), Version()),
    Case("version-with-stray", ("-v", "extra"), Version()),
    Case("version-after-illegal", ("-x", "-v"), illegal("spiped", "-x")),
    Case("version-after-bad-number", ("-o", "abc", "-v"), invalid("-o", "abc")),
    # Key file.
    Case("key-missing", ("-e", "-F") + S + T + ("-k", "{missing}"),
         Fails(("spiped: Cannot open file: {missing}: No such file or directory",
                "spiped: Error reading shared secret"))),
    Case("key-is-directory", ("-e", "-F") + S + T + ("-k", "{keydir}"),
         Fails(("spiped: Error reading file: {keydir}: Is a directory",
                "spiped: Error reading shared secret"))),
    # Addresses.
    Case("source-no-port", ("-e", "-F", "-s", "nonsense") + T + K,
         unresolvable("nonsense", "Address must contain port number: nonsense")),
    bad_target("target-no-port", "nonsense", "Address must contain port number: nonsense"),
    bad_target("target-bad-ipv4", "[999.1.1.1]:1", "Error parsing IP address: 999.1.1.1"),
    bad_target("target-bad-ipv6", "[::g]:1", "Error parsing IP address: ::g"),
    bad_target("target-port-0", "[127.0.0.1]:0", "Invalid port number: 0"),
    bad_target("target-port-65536", "[127.0.0.1]:65536", "Invalid port number: 65536"),
    bad_target("target-port-5x", "[127.0.0.1]:5x", "Invalid port number: 5x"),
    bad_target("target-unclosed-bracket", "[::1:80", "Invalid [IP address]: [::1"),
    Case("source-unix-path-108", ("-e", "-F", "-s", "{long108}") + T + K,
         unresolvable("{long108}", "socket path too long: {long108}")),
    bad_target("target-unresolvable", "nonexistent.invalid:80",
               re.compile(r"spiped: Error looking up nonexistent\.invalid: " + DNS_FAIL)),
    # Empty addresses and a missing host: see ADDRESS_CASES below.
    # Binding.
    # Ours adds a line saying why it left the file alone (it removes only
    # stale sockets).
    Case("source-is-regular-file", ("-e", "-F", "-s", "{regfile}") + T + K,
         Fails(("spiped: Error binding socket: Address already in use",)),
         ours=Fails(("spiped: Error binding socket: Address already in use",
                     "spiped: {regfile} exists and is not a socket; not removing it"))),
    Case("source-port-in-use", ("-e", "-F", "-s", "{busy}") + T + K,
         Fails(("spiped: Error binding socket: Address already in use",))),
    # Pidfile: the parent reports the child's failure (no -F here).
    Case("pidfile-missing-directory", ("-e",) + S + T + K + ("-p", "{missing}/x.pid"),
         Fails(("spiped: fopen({missing}/x.pid): No such file or directory",
                "spiped: Failed to daemonize"))),
    # -u: names are looked up after binding; the group is handled first.
    Case("u-no-such-user", base("-u", "nosuchuser"), drop_failed("No such user: nosuchuser")),
    Case("u-no-such-group", base("-u", ":nosuchgroup"), drop_failed("No such group: nosuchgroup")),
    Case("u-user-no-such-group", base("-u", "nobody:nosuchgroup"),
         drop_failed("No such group: nosuchgroup")),
    Case("u-no-such-user-group", base("-u", "nosuchuser:nogroup"), drop_failed("No such user: nosuchuser")),
    Case("u-both-unknown", base("-u", "nosuchuser:nosuchgroup"), drop_failed("No such group: nosuchgroup")),
    Case("u-empty-group", base("-u", "nobody:"), drop_failed('Empty group name: "nobody:"')),
    Case("u-colon-only", base("-u", ":"), drop_failed('Empty group name: ":"')),
    Case("u-empty", base("-u", ""), drop_failed('Need to specify user and/or group: ""')),
    Case("u-second-colon", base("-u", "nobody:nogroup:x"), drop_failed("No such group: nogroup:x")),
    Case("u-negative-id", base("-u", "-1"), drop_failed("No such user: -1")),
    Case("u-id-overflow", base("-u", "4294967296"), drop_failed("No such user: 4294967296")),
    # Start-up order: options, source, target, key, bind, privileges.
    Case("order-options-before-addresses", ("-e", "-F") + S + ("-t", "nonsense") + K + ("-o", "abc"),
         invalid("-o", "abc")),
    Case("order-source-before-target", ("-e", "-F", "-s", "nonsense", "-t", "[999.1.1.1]:1") + K,
         unresolvable("nonsense", "Address must contain port number: nonsense")),
    Case("order-target-before-key", ("-e", "-F") + S + ("-t", "nonsense", "-k", "{missing}"),
         unresolvable("nonsense", "Address must contain port number: nonsense")),
    Case("order-key-before-bind", ("-e", "-F", "-s", "{busy}") + T + ("-k", "{missing}"),
         Fails(("spiped: Cannot open file: {missing}: No such file or directory",
                "spiped: Error reading shared secret"))),
    Case("order-bind-before-drop", ("-e", "-F", "-s", "{busy}") + T + K + ("-u", "nosuchuser"),
         Fails(("spiped: Error binding socket: Address already in use",))),
    # Accepted edge values.
    Case("accept-o-0", base("-o", "0"), Starts()),
    Case("accept-o-minus-0", base("-o", "-0"), Starts()),
    Case("accept-o-inf", base("-o", "inf"), Starts()),
    Case("accept-o-infinity", base("-o", "infinity"), Starts()),
    Case("accept-o-huge", base("-o", "1e300"), Starts()),
    Case("accept-o-tiny", base("-o", "1e-300"), Starts()),
    Case("accept-o-hex", base("-o", "0x10"), Starts()),
    Case("accept-o-leading-space", base("-o", " 5"), Starts()),
    Case("accept-n-0", base("-n", "0"), Starts()),
    Case("accept-n-minus-1", base("-n", "-1"), Starts()),
    Case("accept-n-hex", base("-n", "0x10"), Starts()),
    Case("accept-n-octal", base("-n", "010"), Starts()),
    Case("accept-n-plus", base("-n", "+5"), Starts()),
    Case("accept-n-leading-space", base("-n", " 5"), Starts()),
    Case("accept-n-2-to-32", base("-n", "4294967296"), Starts()),
    Case("accept-n-max", base("-n", "18446744073709551615"), Starts()),
    Case("accept-r-60-R", base("-r", "60", "-R"), Starts()),
    Case("accept-r-60.0-R", base("-r", "60.0", "-R"), Starts()),
    Case("accept-r-0-R", base("-r", "0", "-R"), Starts()),
    Case("accept-r-minus-0-R", base("-r", "-0", "-R"), Starts()),
    Case("accept-r-inf", base("-r", "inf"), Starts()),
    Case("accept-r-nan", base("-r", "nan"), Starts()),
    Case("accept-grouped-flags", ("-eF",) + S + T + K, Starts()),
    Case("accept-attached-arguments", ("-eF",) + S + T + ("-k{key}", "-o5"), Starts()),
    Case("accept-argument-in-group", ("-eFo5",) + S + T + K, Starts()),
    Case("accept-trailing-double-dash", base("--"), Starts()),
    Case("accept-syslog-foreground", base("--syslog"), Starts()),
    Case("accept-decrypt", ("-d", "-F") + S + T + K, Starts()),
    Case("accept-unix-path-107", ("-e", "-F", "-s", "{sock107}") + T + K, Starts("{sock107}")),
]


# ---------------------------------------------------------------------------
# spipe: command lines

def spipe_unresolvable(addr, first):
    return unresolvable(addr, first, prog="spipe")


SPIPE_CASES = [
    Case("no-args", (), USAGE_ONLY, prog="spipe"),
    Case("no-t", ("-k", "{key}"), USAGE_ONLY, prog="spipe"),
    Case("no-k", ("-t", "{tgt}"), USAGE_ONLY, prog="spipe"),
    Case("f-and-g", ("-t", "{tgt}", "-k", "{key}", "-f", "-g"), USAGE_ONLY, prog="spipe"),
    Case("repeat-j", ("-t", "{tgt}", "-k", "{key}", "-j", "-j"), USAGE_ONLY, prog="spipe"),
    Case("stray-argument", ("-t", "{tgt}", "-k", "{key}", "extra"), USAGE_ONLY, prog="spipe"),
    Case("o-nan", ("-t", "{tgt}", "-k", "{key}", "-o", "nan"), USAGE_ONLY, prog="spipe"),
    Case("illegal-option", ("-x",), illegal("spipe", "-x"), prog="spipe"),
    Case("illegal-spiped-option", ("-t", "{tgt}", "-k", "{key}", "-e"), illegal("spipe", "-e"), prog="spipe"),
    Case("illegal-syslog", ("-t", "{tgt}", "-k", "{key}", "--syslog"), illegal("spipe", "--syslog"),
         prog="spipe"),
    Case("k-without-argument", ("-t", "{tgt}", "-k"), missing_arg("spipe", "-k"), prog="spipe"),
    Case("t-without-argument", ("-k", "{key}", "-t"), missing_arg("spipe", "-t"), prog="spipe"),
    Case("o-not-a-number", ("-t", "{tgt}", "-k", "{key}", "-o", "abc"), invalid("-o", "abc", "spipe"),
         prog="spipe"),
    Case("o-negative", ("-t", "{tgt}", "-k", "{key}", "-o", "-1"), out_of_range("-o", "-1", "spipe"),
         prog="spipe"),
    Case("version", ("-v",), Version(), prog="spipe"),
    Case("version-after-illegal", ("-x", "-v"), illegal("spipe", "-x"), prog="spipe"),
    Case("key-missing", ("-t", "{tgt}", "-k", "{missing}"),
         Fails(("spipe: Cannot open file: {missing}: No such file or directory",
                "spipe: Error reading shared secret")), prog="spipe"),
    Case("target-no-port", ("-t", "nonsense", "-k", "{key}"),
         spipe_unresolvable("nonsense", "Address must contain port number: nonsense"), prog="spipe"),
    Case("target-unresolvable", ("-t", "nonexistent.invalid:80", "-k", "{key}"),
         spipe_unresolvable("nonexistent.invalid:80",
                            re.compile(r"spipe: Error looking up nonexistent\.invalid: " + DNS_FAIL)),
         prog="spipe"),
    # Nothing listens on {tgt}; the copy threads may add their own message.
    Case("target-refused", ("-t", "{tgt}", "-k", "{key}"),
         Fails(("spipe: Could not connect",), extra=re.compile(r"spipe: Error (reading|writing).*")),
         prog="spipe"),
    # 1.6.2: "spipe: illegal option -- -b" + usage.
    Case("b-bind-address", ("-t", "{tgt}", "-k", "{key}", "-b", "[127.0.0.1]"), C_FAILS,
         ours=Fails(("spipe: Could not connect",), extra=re.compile(r"spipe: Error (reading|writing).*")),
         prog="spipe"),
]


# ---------------------------------------------------------------------------
# Address forms: -s, -t, spipe -t and -b
#
# C 1.6.2 splits an address that is not a unix path at its last ':' and
# hands a host without '[' to getaddrinfo() unchanged, so a bare IPv6
# address with a port works (-t ::1:8026, -s :::8025).  1.6.4 refuses every
# address that starts with ':' ("No host in ..." and usage), which was meant
# for ":8025" and also catches those.  Ours takes what 1.6.2 takes, and keeps
# 1.6.4's refusal (SPEC §9) for an empty address and for one whose part
# before the last ':' is no IPv6 address (":8026", and "::1", which is the
# host ":" and the port "1"); C is held to the exit status there.
#
# Accepted means: spiped (-F) listens; spipe tries to connect and reports
# "Could not connect", since nothing listens on {tgt_port}.  A zone id works
# in a bare address (getaddrinfo() reads it) and nowhere else: inet_pton()
# refuses it in brackets, and glibc refuses it on an address that is not
# link-local.

SPIPE_CONNECTS = Fails(("spipe: Could not connect",),
                       extra=re.compile(r"spipe: Error (reading|writing).*"))
EMPTY = re.compile(r"(spiped|spipe): Empty socket address\.?")


def no_host(prog, addr):
    return Fails(('%s: No host in "%s"' % (prog, addr),), usage=True)


def refused_before_resolving(prog, addr):
    """1.6.2 resolves ADDR and fails (exit 1); ours refuses it as 1.6.4 does."""
    return dict(c=C_FAILS, ours=no_host(prog, addr))


# (name, address, how C 1.6.2 takes it and ours where it differs: a dict,
# or "accepted"), for -t and spipe -t; {port} is a port nobody listens on.
TARGET_FORMS = [
    ("bracketed-ipv6", "[::1]:{port}", "accepted"),
    ("bare-ipv6", "::1:{port}", "accepted"),
    ("bare-ipv6-unspecified", ":::{port}", "accepted"),
    ("bare-ipv4-mapped", "::ffff:127.0.0.1:{port}", "accepted"),
    ("bare-ipv6-service-name", "::1:http", "accepted"),
    ("ipv4", "127.0.0.1:{port}", "accepted"),
    ("bracketed-ipv4", "[127.0.0.1]:{port}", "accepted"),
    ("name", "localhost:{port}", "accepted"),
    ("zone-id", "fe80::1%lo:{port}", "accepted"),
    ("bracketed-zone-id", "[fe80::1%lo]:{port}",
     dict(lines=("Error parsing IP address: fe80::1%lo",))),
    ("zone-id-not-link-local", "::1%lo:{port}",
     dict(lines=(re.compile(r"(spiped|spipe): Error looking up ::1%lo: " + DNS_FAIL),))),
    ("bracketed-ipv6-no-port", "[::1]", dict(lines=("Invalid [IP address]: [:",))),
    ("bare-ipv6-no-port", "::1", "no-host"),
    ("no-host", ":{port}", "no-host"),
    ("empty", "", "empty"),
]


def address_expectation(prog, addr, how, accepted):
    """(C's expectation, ours or None) for ADDR given to PROG, as HOW says."""
    if how == "accepted":
        return accepted, None
    if how == "no-host":
        return C_FAILS, no_host(prog, addr)
    if how == "empty":
        return C_FAILS, Fails((EMPTY,), usage=True)
    lines = tuple(l if isinstance(l, re.Pattern) else "%s: %s" % (prog, l) for l in how["lines"])
    return Fails(lines + ("%s: Error resolving socket address: %s" % (prog, addr),)), None


def address_cases():
    cases = []
    for name, form, how in TARGET_FORMS:
        addr = form.replace("{port}", "{tgt_port}")
        c, ours = address_expectation("spiped", addr, how, Starts())
        cases.append(Case("t-" + name, ("-e", "-F") + S + ("-t", addr) + K, c, ours))
        c, ours = address_expectation("spipe", addr, how, SPIPE_CONNECTS)
        cases.append(Case("spipe-t-" + name, ("-t", addr, "-k", "{key}"), c, ours, prog="spipe"))
    # -s: the same forms where something can listen ({v6_port} is free on ::1).
    for name, form, how in TARGET_FORMS:
        if "zone" in name or "service" in name:
            continue
        addr = form.replace("{port}", "{v6_port}")
        c, ours = address_expectation("spiped", addr, how, Starts("[::1]:{v6_port}"))
        cases.append(Case("s-" + name, ("-e", "-F", "-s", addr) + T + K, c, ours))
    return cases


# -b (1.6.3+; 1.6.2 says "illegal option -- -b"), checked against SPEC §6
# and 1.6.4: the forms of -t, and without a port ":0" is added.  A bare
# IPv6 address is split at its last ':' like any other, so "::1" is the host
# ":" with the port "1" and is refused as 1.6.4 refuses it; a bare IPv6 bind
# address is written "[::1]" or "::1:0".
B_ILLEGAL = illegal("spiped", "-b")
BIND_CASES = [
    Case("b-" + name, base("-b", addr), B_ILLEGAL, ours=ours)
    for name, addr, ours in [
        ("bracketed-ipv6-no-port", "[::1]", Starts()),
        ("bracketed-ipv6", "[::1]:0", Starts()),
        ("bare-ipv6", "::1:0", Starts()),
        ("bare-ipv6-no-port", "::1", no_host("spiped", "::1")),
        ("ipv4-no-port", "127.0.0.1", Starts()),
        ("bracketed-ipv4-no-port", "[127.0.0.1]", Starts()),
        ("name-no-port", "localhost", Starts()),
        ("name", "localhost:0", Starts()),
        ("no-host", ":0", no_host("spiped", ":0")),
        ("empty", "", Fails((EMPTY,), usage=True)),
    ]
] + [
    Case("spipe-b-bare-ipv6", ("-t", "[::1]:{tgt_port}", "-k", "{key}", "-b", "::1:0"),
         illegal("spipe", "-b"), ours=SPIPE_CONNECTS, prog="spipe"),
    Case("spipe-b-bare-ipv6-no-port", ("-t", "[::1]:{tgt_port}", "-k", "{key}", "-b", "::1"),
         illegal("spipe", "-b"), ours=no_host("spipe", "::1"), prog="spipe"),
]

ADDRESS_CASES = address_cases() + BIND_CASES


# ---------------------------------------------------------------------------
# spiped: an extension's errors (ours only; C knows none of these options)
#
# An error that involves a long option other than C's --syslog says which
# option and why on one line, then prints C's usage text; the same command
# line without the extension keeps C's output (the tables above).

def extension(option, reason):
    return Fails(("spiped: %s: %s" % (option, reason),), usage=True)


EXTENSION_CASES = [
    Case("accept-key-with-e", base("--accept-key", "{key}"),
         extension("--accept-key", "needs -d")),
    Case("connect-after-auth-with-e", base("--connect-after-auth"),
         extension("--connect-after-auth", "needs -d")),
    Case("drain-timeout-nan", base("--drain-timeout", "nan"),
         extension("--drain-timeout", "not a number of seconds: nan")),
    Case("drain-timeout-word", base("--drain-timeout", "soon"),
         extension("--drain-timeout", "not a number of seconds: soon")),
    Case("drain-timeout-negative", base("--drain-timeout", "-1"),
         extension("--drain-timeout", "must be 0 or more: -1")),
    Case("drain-timeout-overflow", base("--drain-timeout", "1e400"),
         extension("--drain-timeout", "out of range: 1e400")),
    Case("drain-timeout-twice", base("--drain-timeout", "1", "--drain-timeout", "1"),
         extension("--drain-timeout", "given more than once")),
    Case("socket-mode-not-octal", base("--socket-mode", "9"),
         extension("--socket-mode", "not an octal mode from 0 to 7777: 9")),
    Case("proxy-protocol-3", base("--proxy-protocol", "3"),
         extension("--proxy-protocol", "must be 1 or 2: 3")),
    Case("keepalive-words", base("--keepalive", "5,x"),
         extension("--keepalive", "not IDLE[,INTERVAL[,COUNT]] in whole seconds: 5,x")),
    Case("keepalive-zero", base("--keepalive", "0"),
         extension("--keepalive", "IDLE and INTERVAL must be 1 to 32767, COUNT 1 to 127: 0")),
    Case("keepalive-with-j", base("-j", "--keepalive", "5"),
         extension("--keepalive", "cannot go with -j, which turns keepalive off")),
    Case("flag-with-value", base("--log-connections=yes"),
         extension("--log-connections", "takes no argument")),
    Case("config-without-argument", ("--config",), extension("--config", "needs an argument")),
    Case("config-with-tunnel-option", ("-F", "--config", "{key}", "-n", "4"),
         extension("--config", "tunnel options belong in the file, not on the command line: -n")),
    Case("metrics-empty", base("--metrics", ""), extension("--metrics", "Empty socket address")),
    # Errors of C's own options stay C's, extensions or not.
    Case("extension-and-f-g", base("--log-connections", "-f", "-g"), USAGE_ONLY),
    Case("extension-and-repeat-k", base("--log-connections", "-k", "{key}"), USAGE_ONLY),
    Case("extension-and-o-nan", base("--log-connections", "-o", "nan"), USAGE_ONLY),
    Case("syslog-twice", base("--syslog", "--syslog"), USAGE_ONLY),
    Case("syslog-with-value", base("--syslog=yes"), illegal("spiped", "--syslog")),
    Case("unknown-long-option", base("--accept-keys", "{key}"), illegal("spiped", "--accept-keys")),
]


@pytest.mark.parametrize("case", EXTENSION_CASES, ids=[c.id for c in EXTENSION_CASES])
def test_extension_errors_say_why(case, ctx, procs):
    check_case("ours", case, ctx, procs)


def params(cases):
    out = []
    for case in cases:
        for impl in ("c", "ours"):
            marks = [need_c] if impl == "c" else []
            out.append(pytest.param(impl, case, id="%s-%s" % (impl, case.id), marks=marks))
    return out


# ---------------------------------------------------------------------------
# Running

def command(impl, prog, args):
    """The argv that runs PROG (spiped or spipe) of IMPL with ARGS."""
    if impl == "c":
        return [C_SPIPED if prog == "spiped" else C_SPIPE, *args]
    extra = ["spipe"] if prog == "spipe" else []
    return [sys.executable, SPIPED_PY, *extra, *args]


def kill_pidfiles(directory):
    """Kill any stray daemon named by a *.pid file in DIRECTORY.

    Only a process whose command line mentions DIRECTORY (every command here
    names its key file there) is killed, never one that reused the PID.
    """
    for name in os.listdir(directory):
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                pid = int(f.read().strip() or 0)
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                ours = os.fsencode(directory) in f.read()
        except (OSError, ValueError):
            continue
        if pid > 1 and ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def run(cmd, cwd):
    """Run CMD to completion; fail the test if it is still going after RUN_TIMEOUT."""
    try:
        return subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_pidfiles(cwd)
        pytest.fail("%r did not exit within %ss: it started instead of failing" % (cmd, RUN_TIMEOUT))


def split_usage(stderr, prog):
    """(message lines, usage text or None) from STDERR."""
    text = stderr.decode(errors="replace")
    at = text.find("usage: %s" % prog)
    if at < 0:
        return text.splitlines(), None
    return text[:at].splitlines(), text[at:]


def match_line(want, got, ctx):
    if isinstance(want, re.Pattern):
        return want.fullmatch(got) is not None
    return want.format(**ctx) == got


def check_fails(expect, result, impl, prog, ctx):
    """Assert RESULT (a CompletedProcess) fails the way EXPECT says."""
    err = result.stderr.decode(errors="replace")
    assert result.returncode == expect.rc, "exit %s, stderr:\n%s" % (result.returncode, err)
    assert result.stdout == b""
    if expect.lines is None:
        return
    lines, usage = split_usage(result.stderr, prog)
    if expect.usage:
        assert usage is not None, "no usage text in:\n" + err
        if impl == "ours":
            assert usage == USAGE[prog]
        else:
            assert usage.startswith(USAGE_START[prog])
    else:
        assert usage is None, "unexpected usage text in:\n" + err
    if expect.extra is not None:
        lines = [l for l in lines if not expect.extra.fullmatch(l)]
    want = list(expect.lines)
    assert len(lines) == len(want) and all(match_line(w, g, ctx) for w, g in zip(want, lines)), \
        "messages %r, expected %r" % (lines, [w if isinstance(w, re.Pattern) else w.format(**ctx)
                                             for w in want])


def check_version(result, prog):
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err
    assert result.stdout == b""
    assert re.fullmatch(r"%s \S+\n" % prog, err), err


@pytest.fixture
def ctx(tmp_path, keyfile):
    """Placeholders for the tables: addresses, files and a port in use."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    short = tempfile.mkdtemp(prefix="cli", dir="/tmp")
    src_port = free_port()
    tgt_port = free_port()
    while tgt_port == src_port:
        tgt_port = free_port()
    (tmp_path / "regular").write_bytes(b"not a socket")
    (tmp_path / "keydir").mkdir()
    values = {
        "tmp": str(tmp_path),
        "key": keyfile,
        "src": tcp_addr(src_port),
        "tgt": tcp_addr(tgt_port),
        "tgt_port": tgt_port,
        "v6_port": free_port("::1") if have_ipv6() else 0,
        "busy": tcp_addr(busy.getsockname()[1]),
        "regfile": str(tmp_path / "regular"),
        "keydir": str(tmp_path / "keydir"),
        "missing": str(tmp_path / "missing"),
        "long108": "/" + "a" * 107,
    }
    values["sock107"] = os.path.join(short, "s" * (107 - len(short) - 1))
    assert len(values["sock107"]) == 107
    yield values
    busy.close()
    kill_pidfiles(str(tmp_path))
    shutil.rmtree(short, ignore_errors=True)


def check_case(impl, case, ctx, procs):
    expect = case.expect(impl)
    cmd = command(impl, case.prog, [a.format(**ctx) for a in case.args])
    if isinstance(expect, Starts):
        addr = expect.addr.format(**ctx)
        p = procs.daemon(cmd, addr, cwd=ctx["tmp"])
        assert p.poll() is None, "%r exited after listening" % cmd
        p.kill()
        p.wait(timeout=RUN_TIMEOUT)
        return
    result = run(cmd, ctx["tmp"])
    if isinstance(expect, Version):
        check_version(result, case.prog)
    else:
        check_fails(expect, result, impl, case.prog, ctx)


@pytest.mark.parametrize("impl,case", params(SPIPED_CASES))
def test_spiped_command_line(impl, case, ctx, procs):
    check_case(impl, case, ctx, procs)


@pytest.mark.parametrize("impl,case", params(SPIPE_CASES))
def test_spipe_command_line(impl, case, ctx, procs):
    check_case(impl, case, ctx, procs)


@pytest.mark.skipif(not have_ipv6(), reason="no IPv6 on loopback")
@pytest.mark.parametrize("impl,case", params(ADDRESS_CASES))
def test_address_forms(impl, case, ctx, procs):
    check_case(impl, case, ctx, procs)


def test_usage_texts_match_spec():
    """spiped.py's usage texts are the 1.6.4 ones recorded above (SPEC §7)."""
    import spiped
    assert spiped.SPIPED_USAGE == USAGE_SPIPED
    assert spiped.SPIPE_USAGE == USAGE_SPIPE


# ---------------------------------------------------------------------------
# Failing pidfile and -u in a daemon: what happens to the parent and the child

@pytest.mark.parametrize("impl", [pytest.param("c", marks=need_c), "ours"])
def test_pidfile_failure_leaves_nothing_listening(impl, ctx):
    """After "Failed to daemonize" the child is gone and the socket closed."""
    src = ctx["src"]
    cmd = command(impl, "spiped", ["-e", "-s", src, "-t", ctx["tgt"], "-k", ctx["key"],
                                   "-p", ctx["missing"] + "/x.pid"])
    result = run(cmd, ctx["tmp"])
    assert result.returncode == 1
    assert wait_for(lambda: not address_listening(src), 5)


@pytest.mark.parametrize("impl", [pytest.param("c", marks=need_c), "ours"])
def test_unknown_user_in_daemon(impl, ctx):
    """C: without -F the parent has already exited 0 when the child fails -u.

    The child writes the pidfile, then reports the failure on the inherited
    stderr and exits 1.  Ours looks the names up before daemonizing, so the
    same lines come with exit 1 from the parent and no daemon is left.
    """
    pidfile = os.path.join(ctx["tmp"], "d.pid")
    cmd = command(impl, "spiped", ["-e", "-s", ctx["src"], "-t", ctx["tgt"], "-k", ctx["key"],
                                   "-p", pidfile, "-u", "nosuchuser"])
    result = run(cmd, ctx["tmp"])  # returns once the child closed stderr too
    assert result.stderr.decode().splitlines() == [
        "spiped: No such user: nosuchuser", "spiped: Failed to drop privileges"]
    if impl == "ours":
        assert result.returncode == 1
        assert not os.path.exists(pidfile)
        assert not address_listening(ctx["src"])
        return
    assert result.returncode == 0
    with open(pidfile) as f:
        pid = int(f.read())
    assert wait_for(lambda: pid_gone(pid), 5)


# ---------------------------------------------------------------------------
# -u: privileges after the drop (needs root)

def _ids():
    """(nobody uid, group gid, group name) or None when this system lacks them."""
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None
    for name in ("nogroup", "nobody"):
        try:
            return uid, grp.getgrnam(name).gr_gid, name
        except KeyError:
            pass
    return None


IDS = _ids()
need_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges with -u needs root")
need_ids = pytest.mark.skipif(IDS is None, reason="no nobody user or nogroup group")


DROP_SPECS = [
    # (id, -u argument, expected uid, expected gid); "same" = as started.
    ("user", "nobody", "nobody", "same"),
    ("user-and-group", "nobody:{group}", "nobody", "group"),
    ("group-only", ":{group}", "same", "group"),
    ("numeric-user-and-group", "{uid}:{gid}", "nobody", "group"),
    ("numeric-unknown-ids", "54321:54322", 54321, 54322),
]


@need_root
@need_ids
@pytest.mark.parametrize("impl", [pytest.param("c", marks=need_c), "ours"])
@pytest.mark.parametrize("spec_id,spec,want_uid,want_gid", DROP_SPECS, ids=[d[0] for d in DROP_SPECS])
def test_u_drops_privileges(impl, spec_id, spec, want_uid, want_gid, procs, tmp_path, keyfile):
    """-u sets the named ids, leaves the other as it was, clears groups.

    A user alone does not switch to that user's primary group: C keeps the
    gid it started with.
    """
    uid, gid, group_name = IDS
    want_uid = {"nobody": uid, "same": os.getuid()}.get(want_uid, want_uid)
    want_gid = {"group": gid, "same": os.getgid()}.get(want_gid, want_gid)
    src = tcp_addr(free_port())
    arg = spec.format(group=group_name, uid=uid, gid=gid)
    cmd = command(impl, "spiped", ["-e", "-F", "-s", src, "-t", tcp_addr(free_port()),
                                   "-k", keyfile, "-u", arg])
    p = procs.daemon(cmd, src, cwd=str(tmp_path))
    want = ([want_uid] * 4, [want_gid] * 4, [])
    # The drop follows listen(); give it a moment.
    wait_for(lambda: proc_ids(p.pid) == want, 5)
    got = proc_ids(p.pid)
    assert p.poll() is None, p.log_text()
    assert got == want


@pytest.fixture
def world_dir():
    """A scratch directory nobody can read, holding a key (0600) nobody owns."""
    d = tempfile.mkdtemp(prefix="cli", dir="/tmp")
    os.chmod(d, 0o755)
    key = os.path.join(d, "key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key, 0o600)
    os.chown(key, IDS[0], IDS[1])
    yield d, key
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(cmd):
    """CMD run as nobody with no supplementary groups (needs root and setpriv)."""
    return ["setpriv", "--reuid=%d" % IDS[0], "--regid=%d" % IDS[1], "--clear-groups", *cmd]


def unprivileged_env(directory):
    """An environment in which nobody's Python can import Cryptodome.

    Packages installed under root's home are unreadable to nobody; if so,
    the package is copied into DIRECTORY and put on PYTHONPATH.
    """
    env = dict(os.environ)
    probe = subprocess.run(as_nobody([REAL_PYTHON, "-c", "import Cryptodome"]), cwd=directory,
                           capture_output=True, timeout=RUN_TIMEOUT)
    if probe.returncode == 0:
        return env
    try:
        import Cryptodome
    except ImportError:
        return env  # ours will say what is missing; the test shows it
    site = os.path.join(directory, "site")
    shutil.copytree(os.path.dirname(Cryptodome.__file__), os.path.join(site, "Cryptodome"))
    for root, dirs, files in os.walk(site):
        os.chmod(root, 0o755)
    env["PYTHONPATH"] = site
    return env


@need_root
@need_ids
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
@pytest.mark.parametrize("impl", [pytest.param("c", marks=need_c), "ours"])
@pytest.mark.parametrize("target", ["root", ":root"])
def test_u_without_permission(impl, target, world_dir):
    """An unprivileged spiped asked to become root fails with EPERM.

    Ours runs as a copy of spiped.py in the world-readable scratch folder,
    so where the checkout is does not matter.
    """
    d, key = world_dir
    args = ["-e", "-F", "-s", tcp_addr(free_port()), "-t", tcp_addr(free_port()),
            "-k", key, "-u", target]
    env = None
    cmd = command(impl, "spiped", args)
    if impl == "ours":
        env = unprivileged_env(d)
        shutil.copy(SPIPED_PY, os.path.join(d, "spiped.py"))
        cmd = [REAL_PYTHON, os.path.join(d, "spiped.py"), *args]
    cmd = as_nobody(cmd)
    try:
        result = subprocess.run(cmd, cwd=d, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("%r did not exit within %ss: it started instead of failing" % (cmd, RUN_TIMEOUT))
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().splitlines() == [
        "spiped: Failed to drop privileges: Operation not permitted"]


# What a start loads: -v, --help and usage errors need no cipher, and spipe
# no GMP (its two exponentiations are quicker with the built-in pow()).
_LOADED = """
import json, sys
TRACKED = ("Cryptodome", "Crypto", "cffi", "ctypes", "traceback", "shlex", "ipaddress")
for m in [m for m in sys.modules if m.split(".")[0] in TRACKED]:
    del sys.modules[m]  # loaded by the interpreter's start (an editable install's .pth): count anew
sys.path.insert(0, %r)
import spiped
spiped._exit_now = sys.exit  # report here rather than leave at once
try:
    status = spiped.main(sys.argv[1:])
except SystemExit as e:
    status = e.code
with open("/proc/self/maps") as f:
    maps = f.read()
print(json.dumps([status, sorted(m for m in sys.modules if m.split(".")[0] in TRACKED),
                  "_modexp" in maps]))
"""


def _modules_after(*args, stdin=None):
    """(exit status, modules of interest loaded, whether Cryptodome's monty_pow library
    is mapped) after main(ARGS) in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", _LOADED % os.path.dirname(SPIPED_PY), *args],
                       input=stdin,
                       capture_output=True, timeout=60)
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("args", [
    ["spiped", "-v"], ["spipe", "-v"], ["spiped", "--help"], ["spipe", "-h"],
    ["spiped", "-e", "-s", "[127.0.0.1]:1"],              # a usage error: missing -t, -k
    ["spiped", "-e", "-d"], ["spipe", "-t", "x"], ["spiped", "--no-such-option"],
], ids=" ".join)
def test_version_help_and_usage_errors_load_no_cipher(args):
    status, modules, _ = _modules_after(*args)
    assert status in (0, 1)
    assert not [m for m in modules if ".Cipher" in m or m in ("cffi", "ctypes")], modules
    assert "traceback" not in modules and "shlex" not in modules


def test_spipe_loads_the_cipher_but_not_gmp(procs, keyfile, echo):
    """One request through spipe: the cipher is loaded, and Cryptodome's monty_pow
    computes its exponentiations; Cryptodome's GMP and --allow's ipaddress are not loaded."""
    source = tcp_addr(free_port())
    procs.daemon([sys.executable, SPIPED_PY, "-d", "-F", "-s", source, "-t", echo().addr,
                  "-k", keyfile], source)
    status, modules, monty_pow = _modules_after("spipe", "-t", source, "-k", keyfile,
                                                stdin=b"ping\n")
    assert status == 0
    assert monty_pow
    assert any(m.endswith("Cipher.AES") for m in modules), modules
    assert not [m for m in modules if m.endswith("Math.Numbers")], modules
    assert "ipaddress" not in modules
