#!/usr/bin/env python3
"""spiped for Python: symmetrically encrypted, authenticated pipes between sockets.

A wire-compatible reimplementation of Tarsnap's ``spiped`` and ``spipe``
in one file.  ``spiped -e`` accepts plaintext connections on the source
address and opens encrypted ones to the target; ``spiped -d`` accepts
encrypted connections and forwards plaintext.  ``spipe`` is the client
whose plaintext end is stdin/stdout.  Both ends share a key file.

    client --plain--> [spiped -e: seal] ==packets==> [spiped -d: open] --plain--> target
    client <--plain-- [spiped -e: open] <==packets== [spiped -d: seal] <--plain-- target

The server is a socketserver.ThreadingMixIn server: each accepted
connection gets a new thread, which dials the target and runs the
handshake (nonces, PBKDF2, Diffie-Hellman group 14 unless -f; -d dials
while it shakes hands), then relays one direction and starts a second
thread for the other.  Each relay owns its direction's packet sealer or
opener; the last one to end closes both sockets.  Packets are 1060
bytes: AES-256-CTR over a 1028-byte padded block, then HMAC-SHA256.

Sections, in the order the data flows:
    1. Protocol constants              7. Server (listeners, accept loop,
    2. Errors and logging                 connection limit, drain)
    3. Addresses                       8. Metrics (--metrics)
    4. Cryptography (no I/O)           9. Process (daemon, privileges,
    5. Handshake on a socket              systemd, signals)
       (the Dialer, the key exchange) 10. Supervisor (tunnels, reload)
    6. Relay and the connection       11. Command line and main()

One Supervisor runs every process: the tunnel of a C command line is a
set of one, a --config file a set of many.

Runs on Python 3.9+ with the standard library and Cryptodome
(``pip install pycryptodomex`` or Debian's ``python3-pycryptodome``).
"""

import errno
import functools
import hashlib
import hmac
import os
import re
import selectors
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import _thread
import time
from typing import NamedTuple, Optional  # records; dataclasses would load inspect

__version__ = "1.0.0"
__all__ = [
    "main", "spipe_main", "read_key", "resolve", "handshake",
    "PacketSealer", "PacketOpener", "Server",
]

# ---------------------------------------------------------------------------
# 1. Protocol constants
# ---------------------------------------------------------------------------


NONCE_SIZE = 32          # random bytes each side sends first
DH_SIZE = 256            # group-14 values travel as 256-byte big-endian
MAC_SIZE = 32            # HMAC-SHA256
DH_MESSAGE = DH_SIZE + MAC_SIZE   # y || HMAC(dhmac, y)
PAYLOAD = 1024           # plaintext bytes carried by one packet at most
PADDED = PAYLOAD + 4     # payload, zero padding, 4-byte big-endian length
PACKET = PADDED + MAC_SIZE        # 1060 bytes on the wire
BLOCKS = (PADDED + 15) // 16      # AES blocks of keystream per packet (65)
STRIDE = BLOCKS * 16     # keystream bytes per packet, padded to whole blocks
BATCH = 32               # packets per read at most: as fast in bulk as 64 and as little CPU per
#                          GiB, and half the buffers of each transfer in flight (100 x 1 MiB:
#                          41 MiB against 55-58 per daemon)

# RFC 3526 group 14: the 2048-bit MODP prime; the generator is 2.
DH_PRIME = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
DH_PRIME_BYTES = DH_PRIME.to_bytes(DH_SIZE, "big")
DH_ONE = (1).to_bytes(DH_SIZE, "big")  # what a side without PFS (-f) sends

DEFAULT_TIMEOUT = 5.0    # -o: connect and handshake deadline, seconds
DEFAULT_RTIME = 60.0     # -r: target re-resolution period, seconds
RTIME_FLOOR = 1.0        # -r: at most one look-up a second (C spins on "-r 1e-300");
#                          DNS counts TTLs in whole seconds, -D retries each second
LONGEST_WAIT = 86400.0   # one call of poll() or Event.wait() waits a day at most: poll()
#                          takes a C int of milliseconds (24.8 days), Event.wait() a time_t
#                          (C takes any finite -o or -r); a longer wait is several calls
DEFAULT_MAXCONN = 100    # -n
KEEPALIVE_COUNT = 3      # --keepalive: probes unanswered before a drop, unless given
LISTEN_BACKLOG = 10      # behind a -n limit, as C: a deep queue would keep a good client
#                          waiting behind stalled ones; -n 0 takes the system's somaxconn
SOMAXCONN_FILE = "/proc/sys/net/core/somaxconn"
READ_SIZE = BATCH * PAYLOAD
THREAD_STACK = 256 * 1024  # per thread: test_stack.py runs a connection in 32 KiB;
#                            the re-resolver thread's getaddrinfo() wants more
ABORT_GRACE = 1.0        # after a drain timeout, for aborted connections to close
IDLE_PACKETS = 2         # packets per read while traffic is light
IDLE_READ = IDLE_PACKETS * PAYLOAD
UNIX_PATH_MAX = 108      # sizeof(sun_path) on Linux

# ---------------------------------------------------------------------------
# 2. Errors and logging
# ---------------------------------------------------------------------------


class SpipedError(Exception):
    """A fatal start-up error: each line of .lines is printed with the program name."""

    def __init__(self, *lines):
        super().__init__(lines[0] if lines else "")
        self.lines = lines

    def located(self, where):
        """The same error with WHERE ("FILE:LINE: ") before each line."""
        return SpipedError(*(where + line for line in self.lines)) if where else self


class UsageError(Exception):
    """The command line is wrong: an optional MESSAGE, then the usage text.

    WHY says what is wrong where C prints the usage alone (a --config
    line has no usage text to fall back on); it defaults to MESSAGE.
    """

    def __init__(self, message=None, why=None):
        super().__init__(message or why)
        self.message = message
        self.why = why or message


class AddressError(SpipedError):
    """An address that cannot be parsed or resolved."""


class HandshakeError(Exception):
    """The key exchange failed; .reason is a short word for logs and counters."""

    def __init__(self, reason, detail=None):
        super().__init__(detail or reason)
        self.reason = reason


class ConnectError(Exception):
    """None of the target's addresses could be connected to in time."""


class BadPacket(Exception):
    """A packet failed authentication or carried a bad length.

    .good holds the plaintext of the authentic packets that preceded it.
    """

    def __init__(self, good, why):
        super().__init__(why)
        self.good = good


class Log:
    """Where messages go: stderr with the program name, or syslog once asked."""

    def __init__(self):
        self.prog = "spiped"
        self.label = ""              # "LABEL: " before every line (--log-label)
        self.syslog = None           # the syslog module, once opened
        self.warn_to_syslog = False  # after daemonizing with --syslog
        self.events_to_syslog = False

    def _syslog(self):
        import syslog
        if self.syslog is None:
            syslog.openlog(self.prog, 0, syslog.LOG_USER)  # as C: no PID, user facility
            self.syslog = syslog
        return self.syslog

    def set_label(self, label):
        """Start every later line with LABEL and a colon (--log-label); '' for none."""
        self.label = "%s: " % label if label else ""

    def use_syslog(self, warnings=True):
        """Send events, and WARNINGS too, to syslog from now on."""
        self._syslog()
        self.events_to_syslog = True
        self.warn_to_syslog = warnings

    def warn(self, msg):
        """A warning or error line, as C spiped prints them."""
        if self.warn_to_syslog:
            self.syslog.syslog(self.syslog.LOG_WARNING, self.label + msg)
            return
        try:
            sys.stderr.write("%s: %s%s\n" % (self.prog, self.label, msg))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def event(self, msg):
        """A per-connection or statistics line (only with --log-connections or on demand)."""
        if self.events_to_syslog:
            self.syslog.syslog(self.syslog.LOG_INFO, self.label + msg)
        else:
            self.warn(msg)


log = Log()

# ---------------------------------------------------------------------------
# 3. Addresses
# ---------------------------------------------------------------------------


def _strtol_port(text, allow_zero=False):
    """The port in TEXT as C's strtol(base 10) sees it, or None if invalid."""
    s = text.lstrip(" \t\n\r\f\v")
    digits = s[1:] if s[:1] in "+-" else s
    if not digits or not digits.isdigit() or not digits.isascii():
        return None
    value = int(s)
    if value > 65535 or value < (0 if allow_zero else 1):
        return None
    return value


def _is_ipv6(text):
    """Whether TEXT is an IPv6 address, a %zone allowed (getaddrinfo() reads it)."""
    try:
        socket.inet_pton(socket.AF_INET6, text.partition("%")[0])
    except (OSError, ValueError):
        return False
    return True


def check_address_syntax(addr):
    """Reject what 1.6.4 rejects before resolving: '' and a missing host.

    1.6.4 takes every address that starts with ':' for one without a host,
    which also refuses the bare IPv6 addresses 1.6.2 resolves (::1:8025,
    :::8025); a host that is an IPv6 address is no missing host.
    """
    if addr == "":
        raise UsageError("Empty socket address")
    if addr.startswith(":") and not _is_ipv6(addr.rpartition(":")[0]):
        raise UsageError('No host in "%s"' % addr)


def resolve(addr, allow_zero_port=False):
    """Resolve spiped address ADDR to a list of (family, sockaddr).

    Forms: /unix/path, [1.2.3.4]:port, [::1]:port, host:port.  Raises
    AddressError with C spiped's message lines.
    """
    tail = "Error resolving socket address: %s" % addr
    if addr.startswith("/"):
        if len(os.fsencode(addr)) >= UNIX_PATH_MAX:
            raise AddressError("socket path too long: %s" % addr, tail)
        return [(socket.AF_UNIX, addr)]
    host, colon, port = addr.rpartition(":")
    if not colon:
        raise AddressError("Address must contain port number: %s" % addr, tail)
    if host.startswith("["):
        if not host.endswith("]"):
            raise AddressError("Invalid [IP address]: %s" % host, tail)
        number = _strtol_port(port, allow_zero_port)
        if number is None:
            raise AddressError("Invalid port number: %s" % port, tail)
        ip = host[1:-1]
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            socket.inet_pton(family, ip)
        except (OSError, ValueError):
            raise AddressError("Error parsing IP address: %s" % ip, tail) from None
        if family == socket.AF_INET6:
            return [(family, (ip, number, 0, 0))]
        return [(family, (ip, number))]
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise AddressError("Error looking up %s: %s" % (host, e.strerror), tail) from None
    except UnicodeError:
        raise AddressError("Error looking up %s: Name or service not known" % host, tail) from None
    return [(info[0], info[4]) for info in infos]


def bind_address(addr):
    """The sockaddr list for -b ADDR; a missing port means port 0.

    A bare IPv6 address is split at its last ':' like any other: ::1:0 is
    ::1 with port 0, and ::1 alone (host ":") is refused by
    check_address_syntax(); without a port it is written [::1].
    """
    if not addr.startswith("/") and (":" not in addr or addr.endswith("]")):
        addr += ":0"
    return resolve(addr, allow_zero_port=True)


def format_sockaddr(family, sockaddr):
    """A peer or target address for log lines."""
    if family == socket.AF_UNIX:
        return sockaddr or "unix socket"
    if isinstance(sockaddr, tuple):
        return "[%s]:%d" % (sockaddr[0], sockaddr[1])
    return str(sockaddr)


def _resolve_or_retry(addr, retry, resolver=resolve):
    """resolve(ADDR); with -D, print the resolver's message and retry each second."""
    while True:
        try:
            return resolver(addr)
        except AddressError as e:
            if not retry:
                raise
            log.warn(e.lines[0])
            time.sleep(1)


def _unique(addresses):
    """ADDRESSES in order, each (family, sockaddr) once."""
    seen = set()
    return [a for a in addresses
            if address_key(*a) not in seen and not seen.add(address_key(*a))]


def address_key(family, sockaddr):
    """A comparable form of a bound or resolved address (IP bytes and port, or path)."""
    if family in (socket.AF_INET, socket.AF_INET6):
        host = sockaddr[0].partition("%")[0]
        return family, socket.inet_pton(family, host), sockaddr[1]
    return family, sockaddr

# ---------------------------------------------------------------------------
# 4. Cryptography (no I/O)
# ---------------------------------------------------------------------------


KEY_READ_CHUNK = 65536   # key files are hashed this many bytes at a time


def read_key(path, stdin=None):
    """K = SHA256 of the whole key file at PATH ('-' = stdin).

    Hashes while reading, a chunk at a time, so memory stays flat however
    long the file or stream is.  Raises SpipedError with C's messages.
    Warns (never fails) when a regular key file is readable by others (or
    by a group this process is not in) or shorter than 32 bytes, and when
    stdin gives no byte at all.
    """
    failed = "Error reading shared secret"
    if path == "-":
        try:
            key, size = _hash_all((stdin if stdin is not None else sys.stdin.buffer).read)
        except OSError:
            raise SpipedError("Error reading from stdin", failed) from None
        if size == 0:  # a short key piped in is meant; nothing at all is an accident
            _warn_short_key("the key from stdin", size)
        return key
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SpipedError("Cannot open file: %s: %s" % (path, e.strerror), failed) from None
    try:
        st = os.fstat(fd)
        key, size = _hash_all(functools.partial(os.read, fd))
    except OSError as e:
        raise SpipedError("Error reading file: %s: %s" % (path, e.strerror), failed) from None
    finally:
        os.close(fd)
    if stat.S_ISREG(st.st_mode):
        if st.st_mode & 0o007 or (st.st_mode & 0o070 and not _our_group(st.st_gid)):
            log.warn("WARNING: key file %s is readable by group or others"
                     " (chmod 600 it)" % path)
        if size < 32:
            _warn_short_key("key file " + path, size)
    return key


def _hash_all(read):
    """(SHA-256, length) of what READ(KEY_READ_CHUNK) gives until it gives b""."""
    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: read(KEY_READ_CHUNK), b""):
        digest.update(chunk)
        size += len(chunk)
    return digest.digest(), size


def _warn_short_key(what, size):
    log.warn("WARNING: %s holds only %d bytes; 32 random bytes are recommended" % (what, size))


def _our_group(gid):
    """True when GID is a group this process is in: a key readable by it is not exposed.

    A Kubernetes Secret mounted for a non-root pod is readable by the pod's
    fsGroup, which the process is in.
    """
    return gid == os.getegid() or gid in os.getgroups()


def pbkdf2(key, salt, length):
    """PBKDF2-HMAC-SHA256 with one iteration, as the protocol uses it."""
    return hashlib.pbkdf2_hmac("sha256", key, salt, 1, length)


def hmac_sha256(key, data):
    return hmac.digest(key, data, "sha256")


def dhmac_keys(key, nonce_client, nonce_server):
    """(dhmac_C, dhmac_S): the keys that authenticate each side's DH value."""
    dk = pbkdf2(key, nonce_client + nonce_server, 64)
    return dk[:32], dk[32:]


def traffic_keys(key, nonce_client, nonce_server, shared):
    """(E_C, H_C, E_S, H_S): cipher and MAC keys for each direction."""
    dk = pbkdf2(key, nonce_client + nonce_server + shared, 128)
    return dk[0:32], dk[32:64], dk[64:96], dk[96:128]


_POWER = None  # power(base, exponent) -> 256 bytes, chosen on first use (spipe sets its own)


def _power_function():
    """_POWER, chosen on a daemon's first key pair: GMP through Cryptodome's Integer.

    Loading GMP costs more than an exponentiation or two, so spipe takes
    _monty_power() instead.  Without Cryptodome's C integers, the built-in pow().
    """
    global _POWER
    if _POWER is None:
        try:
            from Cryptodome.Math.Numbers import Integer
        except ImportError:
            try:
                from Crypto.Math.Numbers import Integer
            except ImportError:
                Integer = None
        # IntegerNative is pure Python: no faster than the built-in pow().
        if Integer is None or Integer.__name__ == "IntegerNative":
            _POWER = _builtin_power
        else:
            _POWER = _integer_power(Integer)
    return _POWER


def _integer_power(integer):
    """A power function through Cryptodome's INTEGER class (GMP where it has it)."""
    prime = integer.from_bytes(DH_PRIME_BYTES)

    def power(base, exponent):
        # Big numbers enter INTEGER via from_bytes: far cheaper than from a Python int.
        exp = integer.from_bytes(exponent.to_bytes((exponent.bit_length() + 7) // 8, "big"))
        return pow(integer.from_bytes(base), exp, prime).to_bytes(DH_SIZE)
    return power


def _builtin_power(base, exponent):
    return pow(int.from_bytes(base, "big"), exponent, DH_PRIME).to_bytes(DH_SIZE, "big")


_MONTY_POW = ("int monty_pow(uint8_t *out, const uint8_t *base, const uint8_t *exp,"
              " const uint8_t *modulus, size_t len, uint64_t seed);")


def _monty_power():
    """Cryptodome's monty_pow (C, constant time) as a power function, or None.

    For a process with an exponentiation or two (spipe): its library loads
    in a fraction of GMP's time, and two exponentiations take half the
    instructions of the built-in pow() (28 against 55 million with ctypes).
    """
    package = AES.__name__.split(".")[0]  # the Cryptodome that load_cipher() found
    try:
        import importlib
        raw_api = importlib.import_module(package + ".Util._raw_api")
        lib = raw_api.load_pycryptodome_raw_lib(package + ".Math._modexp", _MONTY_POW)
    except (ImportError, OSError, AttributeError):
        return None
    size, seed, buffer = raw_api.c_size_t(DH_SIZE), raw_api.c_ulonglong, raw_api.create_string_buffer

    def power(base, exponent):
        out = buffer(DH_SIZE)
        if lib.monty_pow(out, base, exponent.to_bytes(DH_SIZE, "big"), DH_PRIME_BYTES, size,
                         seed(int.from_bytes(os.urandom(8), "big"))):
            raise ValueError("monty_pow failed")
        return raw_api.get_raw_buffer(out)
    return power


def _modexp(base, exponent):
    """BASE ** EXPONENT mod p as 256 big-endian bytes; BASE is 256 big-endian bytes."""
    return (_POWER or _power_function())(base, exponent)


_DH_TWO = (2).to_bytes(DH_SIZE, "big")


def dh_keypair(fast, secret=None):
    """(exponent, y) for this side; (None, 1) with -f.

    The exponent is 2^258 + a 256-bit random value, as C spiped uses.
    """
    if fast:
        return None, DH_ONE
    if secret is None:
        secret = os.urandom(32)
    exponent = (1 << 258) + int.from_bytes(secret, "big")
    return exponent, _modexp(_DH_TWO, exponent)


def dh_shared(exponent, y_peer):
    """The shared value y_peer^x mod p; 1 when this side skipped DH (-f)."""
    if exponent is None:
        return DH_ONE
    return _modexp(bytes(y_peer), exponent)


def key_ring(key):
    """KEY as a key ring: a tuple of (name, K); a bare 32-byte K becomes ((None, K),)."""
    if isinstance(key, (bytes, bytearray)):
        return ((None, bytes(key)),)
    return tuple(key)


def match_key(ring, nonce_client, nonce_server, message):
    """(name, K, dhmac_C, dhmac_S) of the RING key whose dhmac_C authenticates
    the client's DH MESSAGE, or None.

    Every key is tried, each compared in constant time, whichever matches:
    the time taken says nothing about which key (if any) the client used.
    The first matching key wins.
    """
    y, mac = message[:DH_SIZE], message[DH_SIZE:]
    found = None
    for name, key in ring:
        mac_c, mac_s = dhmac_keys(key, nonce_client, nonce_server)
        if hmac.compare_digest(hmac_sha256(mac_c, y), mac) and found is None:
            found = (name, key, mac_c, mac_s)
    return found


def check_dh_message(message, dhmac, require_pfs):
    """Validate the peer's y || MAC; raises HandshakeError, returns y."""
    y, mac = message[:DH_SIZE], message[DH_SIZE:]
    if not hmac.compare_digest(hmac_sha256(dhmac, y), mac):
        raise HandshakeError("bad-mac", "bad MAC on the peer's DH value (wrong key?)")
    if y >= DH_PRIME_BYTES:
        raise HandshakeError("garbage", "peer's DH value is not below p")
    if require_pfs and y == DH_ONE:
        raise HandshakeError("no-pfs", "peer skipped Diffie-Hellman (-f) but -g requires it")
    return y


_be64 = struct.Struct(">Q").pack
_be32 = struct.Struct(">I").pack
# Counter blocks of packet n are be64(n) || be64(i), i = 0..BLOCKS-1:
# joining these with be64(n) as the separator yields exactly that.
_LOW_HALVES = [b""] + [_be64(i) for i in range(BLOCKS)]
_FULL_TRAILER = _be32(PAYLOAD) + bytes(STRIDE - PADDED)
_STRIDE_PAD = bytes(STRIDE - PADDED)


def _raw_crypt_one(package):
    """crypt_one(state, counter, data) through PACKAGE's C functions, or None.

    _crypt_one_public() with the C functions that AES.encrypt() and
    strxor() call in PACKAGE (the Cryptodome that AES came from), on
    either of its back ends: their Python wrappers cost more on one packet
    than the AES itself, so the single-packet path calls them directly.
    STATE is the raw pointer of an ECB cipher that the caller keeps alive;
    DATA is bytes.  The result is a new buffer whose slices are bytes.
    .encrypt is the ECB function it calls.  A Cryptodome without these
    functions, or on another back end, gets the public calls instead.
    """
    try:
        import importlib
        encrypt = importlib.import_module(package + ".Cipher._mode_ecb").raw_ecb_lib.ECB_encrypt
        raw_api = importlib.import_module(package + ".Util._raw_api")
        xor = importlib.import_module(package + ".Util.strxor")._raw_strxor.strxor
        backend = raw_api.backend
    except (ImportError, AttributeError):
        return None
    if backend == "cffi":
        ffi = raw_api.ffi
        new = ffi.new_allocator(should_clear_after_alloc=False)  # every byte is written
        array, buffer = ffi.typeof("uint8_t[%d]" % STRIDE), ffi.buffer

        def crypt_one(state, counter, data):
            out = new(array)
            if encrypt(state, counter.join(_LOW_HALVES), out, STRIDE):
                raise ValueError("AES failed")
            xor(data, out, out, PADDED)  # in place: strxor allows its output to be an input
            return buffer(out)
    elif backend == "ctypes":
        import ctypes
        array = ctypes.c_char * STRIDE
        # Without argtypes ctypes passes an int as a C int: a size_t wants its own type.
        stride, padded = ctypes.c_size_t(STRIDE), ctypes.c_size_t(PADDED)

        def crypt_one(state, counter, data):
            out = array()
            if encrypt(state, counter.join(_LOW_HALVES), out, stride):
                raise ValueError("AES failed")
            xor(data, out, out, padded)
            return out
    else:
        return None
    crypt_one.encrypt = encrypt
    return crypt_one


AES = strxor = None    # Cryptodome's, once load_cipher() ran
_CRYPT_ONE_RAW = None  # _raw_crypt_one() of their package, from load_cipher()


def load_cipher():
    """Import Cryptodome's AES and strxor on first use; False when no Cryptodome is there.

    Only a run that moves packets needs them: -v, --help, a usage error
    and --check start without.
    """
    global AES, strxor, _CRYPT_ONE_RAW
    if AES is None:
        try:
            from Cryptodome.Cipher import AES as cipher
            from Cryptodome.Util.strxor import strxor as xor
        except ImportError:  # PyPI's pycryptodome (not -x) installs as "Crypto".
            try:
                from Crypto.Cipher import AES as cipher
                from Crypto.Util.strxor import strxor as xor
            except ImportError:
                return False
        _CRYPT_ONE_RAW = _raw_crypt_one(cipher.__name__.split(".")[0])
        strxor, AES = xor, cipher  # AES last: others take it as the sign that all is set
    return True


def _crypt_one_public(ecb, counter, data):
    """DATA (PADDED bytes) XOR the keystream of the packet whose be64 number is COUNTER.

    ECB is the packet keys' AES in ECB mode.  Returns bytes, PADDED long.
    """
    return strxor(data, ecb.encrypt(counter.join(_LOW_HALVES))[:PADDED])


_IPAD = bytes(b ^ 0x36 for b in range(256))  # HMAC's key paddings as tables
_OPAD = bytes(b ^ 0x5C for b in range(256))


class _Mac:
    """HMAC-SHA256 with the key's inner and outer states computed once."""

    def __init__(self, key):
        key = key.ljust(64, b"\0")
        self.inner = hashlib.sha256(key.translate(_IPAD))
        self.outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, data, suffix):
        h = self.inner.copy()
        h.update(data)
        h.update(suffix)
        o = self.outer.copy()
        o.update(h.digest())
        return o.digest()


class _PacketKeys:
    """One direction's cipher and MAC keys and its packet counter."""

    pending = b""  # a partial packet waiting for the rest (openers only)

    def __init__(self, cipher_key, mac_key, number=0):
        if AES is None:
            load_cipher()
        self._ecb = AES.new(cipher_key, AES.MODE_ECB)
        self._mac = _Mac(mac_key)
        self.number = number
        self.plaintext = 0  # plaintext bytes sealed or opened so far
        # _crypt_one(_cipher, counter, data): a plain function and its first
        # argument, not a bound method (one of self's own methods held by
        # self is a cycle, which would keep each connection's cipher and MAC
        # states until the cycle collector runs), nor a partial (slower).
        state = getattr(self._ecb, "_state", None)
        if _CRYPT_ONE_RAW is not None and state is not None:
            self._crypt_one, self._cipher = _CRYPT_ONE_RAW, state.get()
        else:
            self._crypt_one, self._cipher = _crypt_one_public, self._ecb

    def _keystream(self, first, count):
        """AES-CTR keystream for packets FIRST..FIRST+COUNT-1, STRIDE bytes each."""
        return self._ecb.encrypt(b"".join([_be64(n).join(_LOW_HALVES)
                                           for n in range(first, first + count)]))


class PacketSealer(_PacketKeys):
    """Turns plaintext into packets for one direction; owns its packet counter."""

    # Plaintext bytes to read at a time: while traffic is light, once busy.
    read_sizes = (IDLE_READ, READ_SIZE)

    def seal(self, data):
        """Packets (1060 bytes each) carrying DATA in chunks of up to 1024 bytes."""
        size = len(data)
        if 0 < size <= PAYLOAD:  # one packet, with the fewest calls (small messages)
            n = self.number
            counter = _be64(n)
            cipher = self._crypt_one(self._cipher, counter,
                                     bytes(data).ljust(PAYLOAD, b"\0") + _be32(size))[:PADDED]
            self.number = n + 1
            self.plaintext += size
            return cipher + self._mac.digest(cipher, counter)
        if not size:
            return b""
        view = memoryview(data)
        count = (size + PAYLOAD - 1) // PAYLOAD
        n = self.number
        plain = []
        for k in range(count):
            chunk = view[k * PAYLOAD:(k + 1) * PAYLOAD]
            plain.append(chunk)
            if len(chunk) == PAYLOAD:
                plain.append(_FULL_TRAILER)
            else:
                plain.append(bytes(PAYLOAD - len(chunk)) + _be32(len(chunk)) + _STRIDE_PAD)
        cipher = memoryview(strxor(b"".join(plain), self._keystream(n, count)))
        out = []
        mac = self._mac.digest
        for k in range(count):
            ct = cipher[k * STRIDE:k * STRIDE + PADDED]
            out.append(ct)
            out.append(mac(ct, _be64(n + k)))
        self.number = n + count
        self.plaintext += size
        return b"".join(out)

    transform = seal  # what relay() calls


class PacketOpener(_PacketKeys):
    """Checks and decrypts packets for one direction; owns its packet counter."""

    # Wire bytes to read at a time: while traffic is light, once busy.
    read_sizes = (IDLE_PACKETS * PACKET, BATCH * PACKET)

    def feed(self, data):
        """Plaintext of the whole packets that DATA completes, as open() gives it.

        A partial packet at the end is kept (.pending) for the next call.
        """
        if self.pending:
            data = self.pending + data
        elif len(data) == PACKET:  # one small message: the most common read
            return self._open_one(bytes(data))
        whole = len(data) - len(data) % PACKET
        self.pending = bytes(data[whole:])
        return self.open(memoryview(data)[:whole]) if whole else b""

    transform = feed  # what relay() calls

    def open(self, wire):
        """Plaintext of the whole packets in WIRE (a multiple of 1060 bytes).

        Every MAC is checked before anything is decrypted.  Raises BadPacket
        (holding the plaintext of the packets before the bad one) on a MAC
        failure or a length outside 1..1024.
        """
        if len(wire) == PACKET:
            return self._open_one(bytes(wire))
        view = memoryview(wire)
        count = len(view) // PACKET
        n = self.number
        mac = self._mac.digest
        compare = hmac.compare_digest
        cts = []
        why = None
        for k in range(count):
            base = k * PACKET
            ct = view[base:base + PADDED]
            if not compare(mac(ct, _be64(n + k)), view[base + PADDED:base + PACKET]):
                why = "MAC mismatch"
                break
            cts.append(ct)
            cts.append(_STRIDE_PAD)
        good = len(cts) // 2
        out = []
        if good:
            plain = memoryview(strxor(b"".join(cts), self._keystream(n, good)))
            for k in range(good):
                base = k * STRIDE
                length = int.from_bytes(plain[base + PAYLOAD:base + PADDED], "big")
                if not 0 < length <= PAYLOAD:
                    why = "bad length field %d" % length
                    good = k
                    break
                out.append(plain[base:base + length])
        self.number = n + good
        data = b"".join(out)
        self.plaintext += len(data)
        if why is not None:
            raise BadPacket(data, why)
        return data

    def _open_one(self, wire):
        """open() of exactly one packet (bytes), with the fewest calls (small messages)."""
        n = self.number
        counter = _be64(n)
        cipher = wire[:PADDED]
        if not hmac.compare_digest(self._mac.digest(cipher, counter), wire[PADDED:]):
            raise BadPacket(b"", "MAC mismatch")
        plain = self._crypt_one(self._cipher, counter, cipher)
        length = int.from_bytes(plain[PAYLOAD:PADDED], "big")
        if not 0 < length <= PAYLOAD:
            raise BadPacket(b"", "bad length field %d" % length)
        self.number = n + 1
        self.plaintext += length
        return plain[:length]

# ---------------------------------------------------------------------------
# 5. Handshake on a socket: dialling, the key exchange
# ---------------------------------------------------------------------------


def _poller():
    """A selector for a socket or two: poll() holds no descriptor of its own."""
    if hasattr(selectors, "PollSelector"):
        return selectors.PollSelector()
    return selectors.DefaultSelector()


def deadline_in(seconds):
    """The monotonic time SECONDS from now; None (no deadline) for None."""
    return None if seconds is None else time.monotonic() + seconds


def wait_length(deadline):
    """Seconds one wait for DEADLINE may take: None without one, <= 0 once it passed.

    At most LONGEST_WAIT: a caller whose wait ended before DEADLINE waits again.
    """
    if deadline is None:
        return None
    return min(deadline - time.monotonic(), LONGEST_WAIT)


def _select_until(selector, deadline):
    """SELECTOR.select() until something is ready, or [] once DEADLINE (None: never) passed."""
    while True:
        left = wait_length(deadline)
        if left is not None and left <= 0:
            return []
        ready = selector.select(left)
        if ready:
            return ready


_KEEPALIVE_TIMERS = tuple(getattr(socket, name, None)
                          for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"))
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)


def user_timeout_ms(timers):
    """TCP_USER_TIMEOUT for --keepalive TIMERS: IDLE + INTERVAL x COUNT seconds, in ms.

    Keepalive probes only an idle connection: with data unacknowledged,
    Linux retransmits for about 15 minutes (tcp_retries2) before it gives
    up.  The user timeout drops it after as long as keepalive would take,
    and (Linux 5.11 on) also a peer whose window stays shut that long.
    """
    idle, interval, count = timers
    return (idle + interval * count) * 1000


def tune_socket(sock, keepalive, timers=None):
    """TCP_NODELAY always; SO_KEEPALIVE on or explicitly off (-j). Errors ignored.

    TIMERS (--keepalive): (idle, interval, count) for TCP_KEEPIDLE,
    TCP_KEEPINTVL and TCP_KEEPCNT, and TCP_USER_TIMEOUT (user_timeout_ms()),
    where the platform has them.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    settings = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(keepalive))]
    settings += [(socket.IPPROTO_TCP, option, value)
                 for option, value in zip(_KEEPALIVE_TIMERS, timers or ()) if option is not None]
    if timers and _USER_TIMEOUT is not None:
        settings.append((socket.IPPROTO_TCP, _USER_TIMEOUT, user_timeout_ms(timers)))
    for level, option, value in settings:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


class Dialer:
    """Connects to the first of a target's addresses that answers, in order.

    start() begins without waiting, so -d can run its handshake meanwhile;
    check() follows an attempt that finished; connected() waits until
    DEADLINE; take() then hands over the blocking socket, tuned by tune_socket().
    Raises ConnectError.
    """

    def __init__(self, addresses, bind=None, keepalive=True, timers=None):
        self.todo = list(addresses)
        self.bind = bind
        self.keepalive = keepalive
        self.timers = timers  # --keepalive's, for tune_socket()
        self.sock = None
        self.pending = False
        self.error = "no addresses"
        self.started = False

    def start(self):
        """Begin connecting to the next address that takes a connect() call."""
        self.started = True
        while self.todo:
            family, sockaddr = self.todo.pop(0)
            try:
                sock = socket.socket(family, _STREAM_NONBLOCK)
            except OSError as e:  # out of descriptors, family unsupported
                self.error = e.strerror or str(e)
                continue
            try:
                if _STREAM_NONBLOCK == socket.SOCK_STREAM:
                    sock.setblocking(False)
                tune_socket(sock, self.keepalive, self.timers)  # from the handshake's first byte
                if self.bind is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(self.bind)
                err = sock.connect_ex(sockaddr)
            except OSError as e:
                err = e.errno or errno.EINVAL
            if err in (0, errno.EINPROGRESS):
                self.sock, self.pending = sock, err != 0
                return
            sock.close()
            self.error = os.strerror(err)
        self.sock = None

    def check(self):
        """The pending connect finished: keep it or try the next address."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.error = os.strerror(err)
            self.close()
            self.start()
        else:
            self.pending = False
        if self.sock is None:
            raise ConnectError(self.error)

    def take(self, deadline):
        """connected(DEADLINE), then hand the socket over, blocking."""
        self.connected(deadline)
        sock, self.sock = self.sock, None
        sock.setblocking(True)
        return sock

    def connected(self, deadline):
        """Wait until an address took the connection, trying each in turn."""
        if not self.started:
            self.start()
        if self.sock is None:
            raise ConnectError(self.error)
        if self.pending:
            selector = _poller()
            try:
                while self.pending:
                    selector.register(self.sock, selectors.EVENT_WRITE)
                    ready = _select_until(selector, deadline)
                    selector.unregister(self.sock)
                    if not ready:
                        self.close()
                        raise ConnectError("timed out")
                    self.check()
            finally:
                selector.close()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class _DeadlineIO:
    """Whole reads and writes on a socket, bounded by a deadline.

    Each call is non-blocking by its MSG_DONTWAIT flag, so the socket's own
    mode (blocking, for the relays) is never switched back and forth.

    With a DIALER (-d), each wait also watches its connect in progress, so
    a target that refuses ends the handshake at once with ConnectError.
    """

    def __init__(self, sock, deadline, dialer=None):
        self.sock = sock
        self.deadline = deadline
        self.dialer = dialer
        self.watched = None  # the dialer's socket while its connect is pending
        self.selector = None  # made on the first wait: data often is there already

    def _watch(self):
        """Follow the dialer's current attempt; ConnectError once all have failed."""
        dialer = self.dialer
        if dialer is None or not dialer.started:
            return
        if dialer.sock is None:
            raise ConnectError(dialer.error)
        want = dialer.sock if dialer.pending else None
        if want is not self.watched:
            if self.watched is not None:
                self.selector.unregister(self.watched)
            if want is not None:
                self.selector.register(want, selectors.EVENT_WRITE)
            self.watched = want

    def _wait(self, event):
        if self.selector is None:
            self.selector = _poller()
            self.selector.register(self.sock, event)
        else:
            self.selector.modify(self.sock, event)
        while True:
            self._watch()
            ready = _select_until(self.selector, self.deadline)
            if not ready:
                raise HandshakeError("timeout", "handshake timed out")
            if any(key.fileobj is self.sock for key, _ in ready):
                return
            self.dialer.check()

    def send(self, data):
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view, _DONTWAIT):]
            except BlockingIOError:
                self._wait(selectors.EVENT_WRITE)
            except OSError as e:
                raise HandshakeError("io", "handshake write: %s" % e.strerror) from None

    def recv(self, size):
        buf = bytearray()
        while len(buf) < size:
            try:
                chunk = self.sock.recv(size - len(buf), _DONTWAIT)
            except BlockingIOError:
                self._wait(selectors.EVENT_READ)
                continue
            except OSError as e:
                raise HandshakeError("io", "handshake read: %s" % e.strerror) from None
            if not chunk:
                raise HandshakeError("closed", "peer closed the connection during the handshake")
            buf += chunk
        return bytes(buf)

    def close(self):
        if self.selector is not None:
            self.selector.close()


class HandshakeResult:
    """What a key exchange gives one side; unpacks as (sealer, opener)."""

    __slots__ = ("sealer", "opener", "key_name")

    def __init__(self, sealer, opener, key_name=None):
        self.sealer = sealer      # PacketSealer for what this side sends
        self.opener = opener      # PacketOpener for what it receives
        self.key_name = key_name  # the ring's name of the key used, or None

    def __iter__(self):
        return iter((self.sealer, self.opener))


def handshake(sock, key, client, fast=False, require_pfs=False, deadline=None,
              nonce=None, secret=None, keys=None, dialer=None, dial_after_auth=False):
    """Run the key exchange on SOCK as client (-e, spipe) or server (-d).

    KEY is one K or a key ring (see key_ring()); a client uses the ring's
    first key, a server whichever key the client's DH message proves.
    Returns a HandshakeResult: (sealer, opener) for this side, and the
    key's name.  DEADLINE (deadline_in()) ends the exchange (None: no limit).
    KEYS (a DHKeyPool) supplies the client's key pair computed ahead of
    time; the server makes its own only once the client's MACed value
    verified, so a peer without the key costs no exponentiation.  DIALER
    (-d) is started once our nonce is sent, or with DIAL_AFTER_AUTH once
    the client's DH message verified, and watched meanwhile: its failure
    raises ConnectError.  NONCE and SECRET fix the random values (for
    known-answer tests).  Raises HandshakeError.
    """
    ring = key_ring(key)
    key_name, key = ring[0]
    io = _DeadlineIO(sock, deadline, dialer)
    try:
        mine = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        io.send(mine)  # never wait for the peer's nonce first
        if dialer is not None and not dial_after_auth:
            dialer.start()
        theirs = io.recv(NONCE_SIZE)
        nonce_c, nonce_s = (mine, theirs) if client else (theirs, mine)
        if client:
            mac_c, mac_s = dhmac_keys(key, nonce_c, nonce_s)
            if keys is not None and not fast and secret is None:
                exponent, y = keys.take()
            else:
                exponent, y = dh_keypair(fast, secret)
            io.send(y + hmac_sha256(mac_c, y))
            y_peer = check_dh_message(io.recv(DH_MESSAGE), mac_s, require_pfs)
        else:
            message = io.recv(DH_MESSAGE)
            if len(ring) == 1:
                mac_c, mac_s = dhmac_keys(key, nonce_c, nonce_s)
            else:
                key_name, key, mac_c, mac_s = _server_key(ring, nonce_c, nonce_s, message)
            y_peer = check_dh_message(message, mac_c, require_pfs)
            if dialer is not None and dial_after_auth:
                # The client learns of a target that cannot be reached as
                # a failed handshake: no answer before the target took it.
                dialer.start()
                dialer.connected(deadline)
            # Only once the client's value passed the checks.
            exponent, y = dh_keypair(fast, secret)
            io.send(y + hmac_sha256(mac_s, y))
        shared = dh_shared(exponent, y_peer)
    finally:
        io.close()
    e_c, h_c, e_s, h_s = traffic_keys(key, nonce_c, nonce_s, shared)
    if client:
        return HandshakeResult(PacketSealer(e_c, h_c), PacketOpener(e_s, h_s), key_name)
    return HandshakeResult(PacketSealer(e_s, h_s), PacketOpener(e_c, h_c), key_name)


def _server_key(ring, nonce_c, nonce_s, message):
    """match_key() for a server with several keys; no match is a bad MAC."""
    found = match_key(ring, nonce_c, nonce_s, message)
    if found is None:
        raise HandshakeError("bad-mac", "bad MAC on the peer's DH value (no accepted key)")
    return found


class DHKeyPool:
    """Diffie-Hellman key pairs computed ahead of time by a background thread.

    Our own y = 2^x mod p then costs nothing on a connection's critical
    path; only the shared value is computed while the peer waits.  Each
    pair is used once.  take() computes inline when the pool is empty.
    The thread starts on first use (so after any fork).
    """

    def __init__(self, size=4):
        self.size = size
        self.ready = []
        self.cond = threading.Condition()
        self.thread = None

    def take(self):
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self._fill, daemon=True)
                self.thread.start()
            pair = self.ready.pop() if self.ready else None
            self.cond.notify()
        return pair if pair is not None else dh_keypair(False)

    def _fill(self):
        while True:
            with self.cond:
                while len(self.ready) >= self.size:
                    self.cond.wait()
            pair = dh_keypair(False)  # GMP releases the interpreter lock
            with self.cond:
                self.ready.append(pair)

# ---------------------------------------------------------------------------
# 6. Relay and the connection
# ---------------------------------------------------------------------------


def relay(read, codec, write, wait=None):
    """Move one direction: READ(n) -> CODEC.transform() -> WRITE() until EOF.

    CODEC is a PacketSealer (plaintext in, packets out) or a PacketOpener
    (packets in, plaintext out; a partial packet waits in it for the rest,
    and one left at EOF is dropped, as C does).  Reads are codec.read_sizes[0]
    while traffic is light and [1] once a read fills up or leaves part of a
    packet.  While light, WAIT() (a one-byte MSG_PEEK) blocks until data is
    there, so an idle connection holds no buffer; it returns b"" at EOF.
    A BadPacket's authentic part is written before it propagates; OSError
    propagates.
    """
    idle, busy = codec.read_sizes
    transform = codec.transform
    size = idle
    while True:
        if wait is not None and size == idle and not wait():
            return
        data = read(size)
        got = len(data)
        if not got:
            return
        try:
            out = transform(data)
        except BadPacket as e:
            if e.good:
                write(e.good)
            raise
        data = None  # a write to a slow reader may block: hold only what it still has to send
        if out:
            write(out)
        out = None  # and nothing while waiting for more
        size = busy if got > idle or got == size or codec.pending else idle


def _peeker(sock):
    """WAIT for relay(): block until SOCK has data; b"" at EOF (a C-level partial)."""
    return functools.partial(sock.recv, 1, socket.MSG_PEEK)


def _shutdown(sock, how):
    """shutdown() that tolerates a peer that already went away.

    ENOTCONN and ECONNRESET (an RST racing our FIN) count as done; other
    errors are raised.
    """
    try:
        sock.shutdown(how)
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNRESET):
            raise


def _shutdown_quietly(sock, how=socket.SHUT_RDWR):
    """shutdown() to wake whoever waits on SOCK; any error means there is nothing to wake."""
    try:
        sock.shutdown(how)
    except OSError:
        pass


# PROXY protocol (HAProxy's proxy-protocol.txt): version 1 is one text
# line, version 2 a binary block that starts with this signature.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _proxy_ipv6_text(packed):
    """IPv6 text for a version 1 line: hex groups only, never a dotted tail."""
    text = socket.inet_ntop(socket.AF_INET6, packed)
    if "." in text:
        text = ":".join("%x" % g for g in struct.unpack(">8H", packed))
    return text


def _proxy_unix_path(path):
    """A unix socket address as the 108 bytes of a version 2 AF_UNIX block."""
    if isinstance(path, str):
        path = os.fsencode(path)
    return (path or b"")[:UNIX_PATH_MAX].ljust(UNIX_PATH_MAX, b"\0")


def proxy_header(version, family, source, destination):
    """The PROXY protocol header, version 1 or 2, describing one connection.

    FAMILY, SOURCE and DESTINATION are the family, peer and local address
    of a stream socket as accept()/getsockname() give them.  TCP over IPv4
    and IPv6 is described exactly (an IPv4-mapped pair as IPv4).  A unix
    socket gives "PROXY UNKNOWN" in version 1 and an AF_UNIX block in
    version 2; with no address at all (unnamed unix sockets, other
    families) version 2 sends LOCAL.  Raises ValueError for other versions.
    """
    if version not in (1, 2):
        raise ValueError("PROXY protocol version must be 1 or 2")
    if family in (socket.AF_INET, socket.AF_INET6):
        src, dst = (socket.inet_pton(family, addr[0].split("%", 1)[0])
                    for addr in (source, destination))
        if family == socket.AF_INET6 and src[:12] == dst[:12] == _V4_MAPPED:
            family, src, dst = socket.AF_INET, src[12:], dst[12:]
        ipv4 = family == socket.AF_INET
        if version == 1:
            if ipv4:
                words = ["TCP4"] + [socket.inet_ntop(socket.AF_INET, a) for a in (src, dst)]
            else:
                words = ["TCP6", _proxy_ipv6_text(src), _proxy_ipv6_text(dst)]
            return ("PROXY %s %s %s %d %d\r\n"
                    % (*words, source[1], destination[1])).encode("ascii")
        # Version 2, command PROXY (0x21); TCP over IPv4 (0x11) or IPv6 (0x21).
        block = src + dst + struct.pack(">HH", source[1], destination[1])
        return (PROXY_V2_SIGNATURE + (b"\x21\x11" if ipv4 else b"\x21\x21")
                + struct.pack(">H", len(block)) + block)
    if version == 1:
        return b"PROXY UNKNOWN\r\n"
    if family == socket.AF_UNIX and (source or destination):
        block = _proxy_unix_path(source) + _proxy_unix_path(destination)
        # Version 2, command PROXY; unix stream (0x31), two 108-byte paths.
        return PROXY_V2_SIGNATURE + b"\x21\x31" + struct.pack(">H", len(block)) + block
    return PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL, no address block


class Connection(socketserver.BaseRequestHandler):
    """The life of one accepted connection: dial, handshake, two relays, teardown.

    socketserver runs setup(), handle() and finish() in the connection's
    own thread (ThreadingMixIn).  handle() opens the tunnel (dial and
    handshake), starts a second thread for the inward direction and
    relays the outward one itself:

        outward: plain --seal--> sealed      inward: sealed --open--> plain

    where plain is the client with -e and the target with -d.  Each of the
    two threads holds the connection and releases it as it ends (the
    first in finish()); the last release runs teardown(), the one place
    where the sockets and the dialer are closed.  abort() cuts both
    directions at any stage.  Both are safe to call twice.
    """

    def setup(self):
        server = self.server
        self.options = server.options
        self.client = self.request
        self.started = time.monotonic()
        self.deadline = deadline_in(self.options.timeout)  # -o: dial (and handshake) by then
        self.lock = threading.Lock()  # guards target, plain, sealed, codecs, failed, holds, closed
        self.dialer = None   # the target's Dialer, from the set-up on
        self.target = None   # the dialled socket, once connected
        self.plain = self.sealed = None  # the plaintext side and the packet side, once connected
        self.codecs = None   # (sealer, opener) once the set-up succeeded
        self.failed = None   # why the connection was cut, if it was
        self.holds = 1       # threads still using the sockets
        self.closed = False
        self.plain_header = 0  # PROXY header bytes sent to the target unsealed (-d)
        self.keyring = server.keyring  # read once: a reload leaves this connection alone
        self.number = server.attach(self)

    def bytes_moved(self):
        """(plaintext bytes source -> target, target -> source) so far."""
        with self.lock:
            codecs = self.codecs
        if codecs is None:
            return 0, 0
        sealed, opened = codecs[0].plaintext, codecs[1].plaintext
        if self.options.decrypt:
            return opened + self.plain_header, sealed
        return sealed, opened

    def handle(self):
        """Open the tunnel; then start the inward relay's thread and relay outward here.

        The second thread starts only once the set-up succeeded, just before
        this one blocks in its first read: it never competes with the
        handshake for the interpreter, and a connection that fails its
        set-up costs no second thread.  Failures of the set-up and of a
        relay end here; any other exception goes to the server's
        handle_error(), which logs it and cuts the connection.
        """
        try:
            codecs = self._open_tunnel()
            if codecs is None:
                return
            sealer, opener = codecs
            with self.lock:
                self.holds += 1
            try:
                _thread.start_new_thread(self._relay_inward, (opener,))
            except RuntimeError:  # no thread to be had: give up this connection
                self.abort("cannot start a thread")
                self.release()
                return
            self._relay(self.plain, sealer, self.sealed)
        except Exception:
            self.server.handle_error(self.request, self.client_address)

    def finish(self):
        """socketserver's last call in the connection's thread: release its hold."""
        self.release()

    def _relay_inward(self, opener):
        """The second relay's thread, started with _thread (no Thread object)."""
        try:
            self._relay(self.sealed, opener, self.plain)
        except Exception:
            self.server.handle_error(self.request, self.client_address)
        finally:
            self.release()

    def _open_tunnel(self):
        """Dial the target and shake hands: (sealer, opener), or None once logged.

        With --proxy-protocol the header goes to the target first.  A
        failure is counted and logged here; an abort() meanwhile ends the
        set-up too.
        """
        stats = self.server.stats
        try:
            result = self._dial_and_shake_hands()
        except ConnectError as e:
            stats.count("connect_failures")
            self._event("connect to %s failed: %s" % (self.options.target, e))
            return None
        except HandshakeError as e:
            stats.count("handshake_failures", e.reason)
            self._event("handshake failed: %s" % e)
            return None
        if result.key_name is not None:
            stats.count("keys", result.key_name)
            self._event("key %s" % result.key_name)
        if self.options.proxy_protocol and not self._send_proxy_header(result.sealer):
            return None
        with self.lock:
            if self.failed is not None:  # aborted during the set-up
                return None
            self.codecs = (result.sealer, result.opener)
        return self.codecs

    def _dial_and_shake_hands(self):
        """Connect to the target and run the handshake; a HandshakeResult.

        -d shakes hands on the accepted socket while the target connect is
        under way (one deadline covers both, and a target that refuses ends
        the handshake at once); --connect-after-auth dials only once the
        client's DH message proved it has the key.  -e dials first; then,
        as in C, its handshake has -o of its own.
        """
        options, server = self.options, self.server
        if not server.accepted_tuned:
            tune_socket(self.client, options.keepalive, options.keepalive_timers)
        self.dialer = Dialer(server.targets, server.bind, options.keepalive,
                             options.keepalive_timers)
        common = dict(fast=options.fast, require_pfs=options.require_pfs)
        if options.decrypt:
            result = handshake(self.client, self.keyring, client=False, deadline=self.deadline,
                               dialer=self.dialer, dial_after_auth=options.connect_after_auth,
                               **common)
            self._connected(self.dialer.take(self.deadline))
            return result
        self._connected(self.dialer.take(self.deadline))
        self.deadline = deadline_in(options.timeout)
        return handshake(self.target, self.keyring, client=True, deadline=self.deadline,
                         keys=server.dh_keys, **common)

    def _connected(self, target):
        """TARGET (blocking) took the connection: name the plaintext and the packet side."""
        with self.lock:
            self.target = target
            if self.options.decrypt:
                self.plain, self.sealed = target, self.client
            else:
                self.plain, self.sealed = self.client, target

    def _send_proxy_header(self, sealer):
        """Write the PROXY header towards the target before any other byte.

        It describes the accepted connection (its peer and local address):
        sealed as the first plaintext with -e, plain to the target with -d.
        Counted like other plaintext.  False when the connection failed.
        """
        decrypt = self.options.decrypt
        try:
            header = proxy_header(self.options.proxy_protocol, self.client.family,
                                  self.client_address, self.client.getsockname())
            self.target.sendall(header if decrypt else sealer.seal(header))
        except OSError as e:
            self._event("writing the PROXY header failed: %s" % (e.strerror or e))
            return False
        if decrypt:
            self.plain_header = len(header)
        return True

    def _relay(self, src, codec, dst):
        """Run one direction; half-close at EOF; a failure aborts both directions.

        I/O errors and bad packets end here; other exceptions propagate.
        """
        try:
            relay(src.recv, codec, dst.sendall, _peeker(src))
            _shutdown(dst, socket.SHUT_WR)
        except BadPacket as e:
            self.abort("bad packet: %s" % e)
        except OSError as e:
            self.abort(e.strerror or str(e))

    def abort(self, why):
        """Cut both directions now, at any stage: wakes every thread waiting on them."""
        with self.lock:
            if self.failed is None:
                self.failed = why
            if self.closed:
                return
            for sock in (self.client, self.target):
                if sock is not None:
                    _shutdown_quietly(sock)

    def release(self):
        """A thread is done with the sockets; the last one tears the connection down."""
        with self.lock:
            self.holds -= 1
            last = self.holds == 0
        if last:
            self.teardown()

    def teardown(self):
        """Close the sockets and the dialer, log the closing line, and free the slot last, once."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            relayed = self.codecs is not None
        for sock in (self.client, self.target):
            if sock is not None:
                sock.close()
        if self.dialer is not None:
            self.dialer.close()
        if relayed:  # a set-up failure logged its own line
            how = "closed" if self.failed is None else "dropped (%s)" % self.failed
            self._event("%s: %d bytes in, %d bytes out, %.3fs"
                        % ((how,) + self.bytes_moved() + (time.monotonic() - self.started,)))
        # Last: a drain ends when the count reaches zero, so the line above
        # must already be written by then.
        self.server.connection_closed(self.request, self)

    def _event(self, text):
        if self.options.log_connections:
            log.event("%sconnection %d: %s" % (self.server.label, self.number, text))

# ---------------------------------------------------------------------------
# 7. Server: listening sockets, accept loop, connection limit, drain
# ---------------------------------------------------------------------------


class Stats:
    """One tunnel's counters, for SIGUSR1 and systemd's STATUS; every change under .lock."""

    REASONS = ("timeout", "bad-mac", "no-pfs", "closed", "garbage", "io")

    def __init__(self):
        self.lock = threading.Lock()
        self.live = 0
        self.total = 0
        self.bytes_in = 0    # plaintext source -> target, of closed connections
        self.bytes_out = 0   # plaintext target -> source, of closed connections
        self.connect_failures = 0
        self.limit_reached = 0
        self.refused = 0     # closed at accept: not in --allow
        self.handshake_failures = dict.fromkeys(self.REASONS, 0)
        self.keys = {}       # key name -> connections that used it

    def accepted(self, limit_reached):
        """A connection was accepted; LIMIT_REACHED: it took the last slot of -n."""
        with self.lock:
            self.live += 1
            self.total += 1
            self.limit_reached += bool(limit_reached)

    def closed(self, bytes_in, bytes_out):
        """A connection ended, having moved these plaintext bytes."""
        with self.lock:
            self.live -= 1
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out

    def count(self, counter, name=None):
        """One more COUNTER ("connect_failures", "refused"); with NAME, one more
        NAME in the table COUNTER ("handshake_failures", "keys")."""
        with self.lock:
            if name is None:
                setattr(self, counter, getattr(self, counter) + 1)
            else:
                table = getattr(self, counter)
                table[name] = table.get(name, 0) + 1

    def add_keys(self, names):
        """List NAMES in the per-key counts (from 0) so an unused key shows."""
        with self.lock:
            for name in names:
                self.keys.setdefault(name, 0)

    def counts(self):
        """(live, total) connections."""
        with self.lock:
            return self.live, self.total

    def snapshot(self, live_bytes):
        """A copy of every counter as a dict; LIVE_BYTES: [(in, out)] of each live connection."""
        with self.lock:
            return {"live": self.live, "total": self.total,
                    "bytes_in": self.bytes_in + sum(b[0] for b in live_bytes),
                    "bytes_out": self.bytes_out + sum(b[1] for b in live_bytes),
                    "connect_failures": self.connect_failures,
                    "limit_reached": self.limit_reached, "refused": self.refused,
                    "handshake_failures": dict(self.handshake_failures),
                    "keys": dict(self.keys)}

    @staticmethod
    def line(s):
        """The statistics line of S, a snapshot()."""
        failures = ",".join("%s=%d" % kv for kv in s["handshake_failures"].items())
        keys = ",".join("%s=%d" % kv for kv in s["keys"].items())
        return ("stats: live=%d total=%d bytes_in=%d bytes_out=%d "
                "handshake_failures=%s connect_failures=%d limit_reached=%d refused=%d"
                % (s["live"], s["total"], s["bytes_in"], s["bytes_out"], failures,
                   s["connect_failures"], s["limit_reached"], s["refused"])
                + (" keys=" + keys if keys else ""))


class AllowList:
    """--allow: the networks whose TCP peers a tunnel serves, and the log of refusals.

    A peer is matched by its address alone (an IPv4-mapped IPv6 one as
    IPv4; a unix peer never matches).  Each refused source gets a line at
    most once a minute, and at most MEMORY sources are remembered (those
    logged in the last minute, oldest forgotten first); refusals not logged
    one by one are summed up in one line a minute.  So a scan from many
    addresses neither floods the log nor grows memory.  Used by the
    server's accept thread only.
    """

    MEMORY = 1024
    PERIOD = 60.0

    def __init__(self, networks, label=""):
        self.networks = networks
        self.label = label       # "SOURCE: " with --config, as connection lines have
        self.logged = {}         # source address -> when its line was written, oldest first
        self.quiet = 0           # refusals not logged one by one in this minute
        self.minute_ends = None  # of the minute that began with its first refusal

    @staticmethod
    def parse(text):
        """CIDR[,CIDR...] -> a tuple of networks; a bare address is one host.

        ValueError, saying why, if an item is no network or has host bits set.
        """
        import ipaddress  # late: only --allow needs it
        networks = []
        for item in text.split(","):
            try:
                networks.append(ipaddress.ip_network(item))
            except ValueError:
                try:
                    meant = ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError("not an address or a network (CIDR): \"%s\"" % item) from None
                raise ValueError("host bits set in %s (the network is %s)" % (item, meant)) from None
        return tuple(networks)

    @staticmethod
    def _address(peer):
        """The IP address of PEER (an accept() address), IPv4 if mapped; None if not IP."""
        import ipaddress
        try:
            ip = ipaddress.ip_address(peer[0].partition("%")[0])
        except (TypeError, ValueError, IndexError, AttributeError):
            return None
        return getattr(ip, "ipv4_mapped", None) or ip

    def admits(self, peer):
        """Whether PEER's address is in one of the networks."""
        ip = self._address(peer)
        return ip is not None and any(ip in network for network in self.networks)

    def refused(self, peer, now):
        """PEER was refused at monotonic time NOW: log it, unless logged lately."""
        while self.logged and next(iter(self.logged.values())) <= now - self.PERIOD:
            del self.logged[next(iter(self.logged))]
        if self.minute_ends is None:
            self.minute_ends = now + self.PERIOD
        source = str(self._address(peer) or "a unix socket")
        if source in self.logged or len(self.logged) >= self.MEMORY:
            self.quiet += 1
        else:
            self.logged[source] = now
            log.event("%srefused a connection from %s: not in --allow" % (self.label, source))
        self.summarize(now)

    def summarize(self, now):
        """At the end of a minute with refusals, one line for those not logged."""
        if self.minute_ends is None or now < self.minute_ends:
            return
        if self.quiet:
            log.event("%srefused %d more connections in the last minute, not logged one by one"
                      % (self.label, self.quiet))
        self.quiet, self.minute_ends = 0, None


class _WakePipe:
    """A self-pipe: wake() from any thread or signal handler ends a select() on it."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)

    def fileno(self):
        return self.read_fd

    def wake(self):
        try:
            os.write(self.write_fd, b"!")
        except OSError:
            pass

    def drain(self):
        """Empty the pipe, once select() said it holds something."""
        try:
            while os.read(self.read_fd, 4096):
                pass
        except OSError:
            pass

    def close(self):
        fds, self.read_fd, self.write_fd = (self.read_fd, self.write_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def _inode(path):
    """(device, inode) of PATH itself (a link is not followed), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class SocketFile:
    """The file of a unix socket this process bound: changed or removed only while ours.

    "Ours" is the same device and inode lstat() saw at bind, so a file or
    symlink put in its place since is never followed, chmod()ed or removed.
    """

    def __init__(self, path):
        self.path = path
        self.inode = _inode(path)

    def ours(self):
        return self.path is not None and _inode(self.path) == self.inode

    def chmod(self, mode):
        if self.ours():
            try:
                os.chmod(self.path, mode)
            except OSError:
                pass

    def remove(self):
        """Unlink the file if it is still ours; later calls do nothing."""
        if self.ours():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.path = None


def clear_stale_socket(path):
    """Before binding PATH: remove it only if it is a dead socket; raises as stale_socket() does."""
    if stale_socket(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        log.warn("Removed stale socket %s" % path)


def stale_socket(path):
    """True if PATH is a dead socket, False if there is nothing; changes nothing.

    Raises SpipedError, as a bind would fail, for a live socket or a file
    that is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    busy = "Error binding socket: Address already in use"
    if not stat.S_ISSOCK(st.st_mode):
        raise SpipedError(busy, "%s exists and is not a socket; not removing it" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        pass  # busy or unreadable: leave it alone
    finally:
        probe.close()
    raise SpipedError(busy, "%s is in use by a running process; not removing it" % path)


def creatable(path, replace=False):
    """None if a file could be made at PATH now, else why not (a strerror); changes nothing.

    Its folder must exist and be writable.  REPLACE (a pidfile): an
    existing file at PATH is opened for writing instead.
    """
    if replace and os.path.exists(path):
        bad = errno.EISDIR if os.path.isdir(path) else (
            None if os.access(path, os.W_OK) else errno.EACCES)
    else:
        folder = os.path.dirname(os.path.abspath(path))
        bad = errno.ENOENT if not os.path.isdir(folder) else (
            None if os.access(folder, os.W_OK | os.X_OK) else errno.EACCES)
    return None if bad is None else os.strerror(bad)


def check_socket_path(path):
    """--check of a unix source PATH: SpipedError, as binding would fail; changes nothing."""
    if stale_socket(path):
        log.warn("%s is a stale socket; a start removes it" % path)
    reason = creatable(path)
    if reason is not None:
        raise SpipedError("Error binding socket: %s" % reason)


def inherited_listeners(environ=os.environ, first_only=False):
    """The LISTEN_FDS sockets systemd passed us (fds 3 on) if LISTEN_PID is ours, in order;
    FIRST_ONLY: fd 3 alone (the others left untouched), warning if there were more.

    Takes the variables out of the environment once they are ours.  Raises
    SpipedError when a socket is not a listening stream socket.
    """
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = max(int(environ.get("LISTEN_FDS", "0")), 0)
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    taken = min(count, 1) if first_only else count
    listeners = [_passed_listener(fd) for fd in range(3, 3 + taken)]
    if first_only and count > 1:
        log.warn("systemd passed %d sockets; serving on the first only" % count)
    return listeners


def _passed_listener(fd):
    """FD as a socket object; SpipedError unless it is a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise SpipedError("Inherited file descriptor %d is not a socket: %s" % (fd, e.strerror))
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        sock.detach()
        raise SpipedError("Inherited file descriptor %d: %s" % (fd, e.strerror))
    if kind != socket.SOCK_STREAM or not accepting:
        sock.detach()
        raise SpipedError("Inherited file descriptor %d is not a listening stream socket" % fd)
    return sock


class ListeningServer(socketserver.TCPServer):
    """A TCPServer bound to a TCP or unix address, or serving a socket handed to it.

    All the care a unix socket's file needs is here: a stale file is
    cleared before bind(), --socket-mode is applied through the umask, and
    the file is removed at close only while it is still the one we bound
    (or adopted from a predecessor that served the same socket).
    """

    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, family, sockaddr, handler, listeners=None, socket_mode=None, more=()):
        self.address_family = listeners[0].family if listeners else family
        self.socket_mode = socket_mode
        self.socket_file = None  # SocketFile of a unix socket we bound or adopted
        self.more_sockets = []   # listening on MORE addresses too (--all-addresses)
        super().__init__(sockaddr, handler, bind_and_activate=False)
        if listeners:  # systemd (or a predecessor) bound and listens for us
            self.socket.close()
            self.socket, self.more_sockets = listeners[0], list(listeners[1:])
            self.server_address = self.socket.getsockname()
            return
        try:
            self._bind_each([(family, sockaddr)] + list(more), bool(more))
        except (OSError, SpipedError):
            self.server_close()
            raise

    def _bind_each(self, addresses, named):
        """Bind and listen on every address, the first as self.socket.

        With NAMED (more than one address), a failure names its address,
        and IPv6 sockets take IPv6 only, so [::] and 0.0.0.0 can share a port.
        """
        for family, sockaddr in addresses:
            try:
                if family == self.address_family and sockaddr == self.server_address:
                    if named and family == socket.AF_INET6:
                        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    self.server_bind()
                    self.server_activate()
                else:
                    self.more_sockets.append(self._listen_too(family, sockaddr))
            except OSError as e:
                if not named:
                    raise
                raise SpipedError("Error binding socket: %s: %s" % (
                    format_sockaddr(family, sockaddr), e.strerror)) from None

    def _listen_too(self, family, sockaddr):
        """A second (third, ...) listening TCP socket of this server, on SOCKADDR."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(self.request_queue_size)
        except OSError:
            sock.close()
            raise
        return sock

    def listening_sockets(self):
        return [self.socket] + self.more_sockets

    def server_bind(self):
        """Bind; a unix socket's stale file is cleared first and its mode set by the umask.

        bind() creates the file with 0o777 & ~umask, so --socket-mode is
        applied through the umask around bind(): a chmod() of the path
        afterwards could follow a symlink swapped in meanwhile.  The umask
        is process-wide; binding happens before any thread serves.
        """
        if self.address_family != socket.AF_UNIX:
            super().server_bind()
            return
        clear_stale_socket(self.server_address)
        mode = self.socket_mode
        old = os.umask(0o777 & ~mode) if mode is not None else None
        try:
            super().server_bind()
        finally:
            if old is not None:
                os.umask(old)
        self.socket_file = SocketFile(self.server_address)

    def adopt_socket_file(self, socket_file):
        """Own SOCKET_FILE (a predecessor bound our listener) and give it our --socket-mode."""
        self.socket_file = socket_file
        if socket_file is not None and self.socket_mode is not None:
            socket_file.chmod(self.socket_mode)

    def release_socket_file(self):
        """Give up the socket file (to a successor): we no longer remove it at close."""
        socket_file, self.socket_file = self.socket_file, None
        return socket_file

    def stop_listening(self):
        """Refuse new connects at once: shut the listeners down, remove our socket file."""
        if self.socket_file is not None:
            self.socket_file.remove()
        for sock in self.listening_sockets():
            _shutdown_quietly(sock)

    def close_listeners(self):
        """Close our listening descriptors (later calls do nothing), as a drain begins.

        A socket that is ours alone goes (a unix listener leaves the
        kernel's tables, and clients still queued in it learn so at once);
        one a successor or systemd also holds stays open through theirs.
        """
        for sock in self.listening_sockets():
            sock.close()

    def server_close(self):
        super().server_close()
        for sock in self.more_sockets:
            sock.close()
        if self.socket_file is not None:
            self.socket_file.remove()


def listen_backlog(max_connections):
    """The listen backlog for a -n of MAX_CONNECTIONS: C's 10 behind a limit.

    Without one (-n 0) every connect is to be served, so a burst waits in
    a queue as deep as the system allows (somaxconn) rather than losing
    its SYNs to a full one of 10.
    """
    if max_connections:
        return LISTEN_BACKLOG
    try:
        with open(SOMAXCONN_FILE, "rb") as f:
            return max(int(f.read()), LISTEN_BACKLOG)
    except (OSError, ValueError):
        return max(socket.SOMAXCONN, LISTEN_BACKLOG)


class Server(socketserver.ThreadingMixIn, ListeningServer):
    """Accepts connections on its listening sockets (TCP or unix) and runs each.

        serve() --accept--> process_request()   (ThreadingMixIn: a new thread)
                                  |
                            Connection: set-up, relay outward
                                  +-- second thread: relay inward

    ListeningServer binds and listens (TCP or unix); the mixin's own
    process_request() starts one thread per connection.  serve() replaces
    serve_forever(): it stops calling accept() while -n connections are
    live (clients wait in the backlog), wakes on a pipe byte from closing
    connections, and returns once a shutdown has drained.
    """

    daemon_threads = True   # exit after a drain without joining anyone
    block_on_close = False  # and keep no list of threads

    def __init__(self, spec, listeners=None, on_change=None):
        self.options = spec.options
        self.label = spec.label
        self.bind = spec.bind
        # Each replaced whole, never changed in place; a connection reads
        # them once, as it starts: targets by the -r thread, set_keyring().
        self.targets = spec.targets
        self.stats = Stats()
        self.allow = AllowList(spec.options.allow, spec.label) if spec.options.allow else None
        self.set_keyring(spec.keyring)
        # -e computes its key pairs ahead; -d only after the client proved the key.
        self.dh_keys = None if spec.options.decrypt or spec.options.fast else DHKeyPool()
        self.on_change = on_change or (lambda: None)  # after each accept and close
        # lock guards live, next_number, drain_deadline and
        # accept_paused_until; it is notified as connections end.
        self.lock = threading.Condition(threading.Lock())
        self.live = {}     # accepted socket -> its Connection (None until it runs)
        self.next_number = 0
        self.drain_deadline = None
        self.accept_paused_until = 0.0
        self.stopping = threading.Event()  # set as the shutdown begins, under lock
        self.accept_error_logged = False  # the serve() thread's own
        self.waker = _WakePipe()
        self.request_queue_size = listen_backlog(spec.options.max_connections)
        super().__init__(spec.family, spec.sockaddr, Connection, listeners,
                         spec.options.socket_mode, spec.more_sources)
        for sock in self.listening_sockets():
            sock.setblocking(False)
            # Linux copies TCP_NODELAY, SO_KEEPALIVE and the keepalive timers from
            # the listening socket to each accepted one: set them once here.
            tune_socket(sock, spec.options.keepalive, spec.options.keepalive_timers)
        self.accepted_tuned = sys.platform.startswith("linux")

    def set_keyring(self, keyring):
        """New connections use KEYRING from now on; live ones keep theirs."""
        self.keyring = keyring
        self.stats.add_keys(name for name, _ in keyring)

    # -- accept loop ------------------------------------------------------

    def full(self):
        limit = self.options.max_connections
        return bool(limit) and len(self.live) >= limit

    def serve(self, tick=1.0):
        """Accept until begin_shutdown(), then until the live connections have ended."""
        selector = selectors.DefaultSelector()
        selector.register(self.waker, selectors.EVENT_READ)
        listening = False
        try:
            while True:
                with self.lock:
                    if self.stopping.is_set() and not self.live:
                        return
                    stopping = self.stopping.is_set()
                    want, timeout = self._next_pass(tick)
                if timeout <= 0:  # the bounded drain ran out
                    self.abort_all(ABORT_GRACE)
                    return
                if want != listening:
                    for sock in self.listening_sockets():
                        if want:
                            selector.register(sock, selectors.EVENT_READ)
                        else:
                            selector.unregister(sock)
                    listening = want
                if stopping:
                    self.close_listeners()
                for key, _ in selector.select(timeout):
                    if key.fileobj is self.waker:
                        self.waker.drain()
                    elif listening:  # the whole queue: one a pass would let it overflow
                        while self._accept_one(key.fileobj):
                            pass
                if self.allow is not None:
                    self.allow.summarize(time.monotonic())
        finally:
            selector.close()

    def _next_pass(self, tick):
        """(accept now?, seconds to wait) for serve(), under .lock; <= 0: drain over."""
        now = time.monotonic()
        want = not self.stopping.is_set() and not self.full() and now >= self.accept_paused_until
        timeout = tick
        if self.accept_paused_until:
            timeout = min(timeout, max(self.accept_paused_until - now, 0.01))
        if self.drain_deadline is not None:
            timeout = min(timeout, self.drain_deadline - now)
        return want, timeout

    def _accept_one(self, listener):
        """Accept and start one connection; False once the queue is empty, -n is reached
        or accepting pauses."""
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionAbortedError:  # gone before we took it: the next one may be there
            return True
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors: pause accepting rather than spin.
                if not self.accept_error_logged:
                    log.warn("Error accepting connection: %s" % e.strerror)
                    self.accept_error_logged = True
                with self.lock:
                    self.accept_paused_until = time.monotonic() + 0.25
            return False
        self.accept_error_logged = False  # the next exhaustion gets its line again
        if not self.verify_request(sock, peer):
            sock.close()  # before any byte, any work, any slot
            return True
        limit = self.options.max_connections
        with self.lock:
            self.accept_paused_until = 0.0
            self.live[sock] = None
            reached = bool(limit) and len(self.live) == limit
            more = not reached and not self.stopping.is_set()
        self.stats.accepted(reached)
        if reached:
            log.warn("Maximum number of connections (%d) reached" % limit)
        self.on_change()
        try:
            self.process_request(sock, peer)
        except RuntimeError:  # cannot start a thread: drop this one
            self.shutdown_request(sock)
            return False
        return more

    def verify_request(self, request, client_address):
        """--allow: False (counted, logged sparingly) for a peer outside its networks."""
        if self.allow is None or self.allow.admits(client_address):
            return True
        self.stats.count("refused")
        self.allow.refused(client_address, time.monotonic())
        return False

    def metrics(self):
        """Stats.snapshot() with live connections' bytes (SIGUSR1's line, --metrics)."""
        with self.lock:  # where a close moves its bytes from live to closed: none twice
            live = [c.bytes_moved() for c in self.live.values() if c is not None]
            return self.stats.snapshot(live)

    # -- connections --------------------------------------------------------

    def attach(self, connection):
        """A connection's thread has started: number it and let abort_all() reach it."""
        with self.lock:
            self.next_number += 1
            number = self.next_number
            self.live[connection.request] = connection
        if self.options.log_connections:
            peer = format_sockaddr(connection.client.family, connection.client_address)
            log.event("%sconnection %d: accepted from %s" % (self.label, number, peer))
        return number

    def handle_error(self, request, client_address):
        """An unexpected exception in a connection's thread: log it, cut the connection."""
        exc = sys.exc_info()[1]
        with self.lock:
            connection = self.live.get(request)
        number = connection.number if connection is not None else 0
        log.warn("connection %d: internal error: %r" % (number, exc))
        import traceback  # late: only a bug needs it
        for line in traceback.format_exc().rstrip().splitlines():
            log.warn(line)
        if connection is not None:
            connection.abort("internal error: %r" % (exc,))

    def shutdown_request(self, request):
        """The mixin's thread is done: close REQUEST if its Connection never started.

        A connection that started released this thread's hold in its own
        finish(), and its teardown closes the socket (TCPServer's version
        would close it under the second relay).
        """
        with self.lock:
            never_started = request in self.live and self.live[request] is None
        if never_started:
            self.close_request(request)
            self.connection_closed(request, None)

    def connection_closed(self, request, connection):
        """Called once per accepted socket as it is closed; frees its slot."""
        moved = connection.bytes_moved() if connection is not None else (0, 0)
        with self.lock:
            # Wake the accept loop only when it waits for this: a free slot,
            # a free descriptor, or the end of a drain.
            waiting = self.full() or self.accept_paused_until or self.stopping.is_set()
            self.stats.closed(*moved)  # with the pop: metrics() sees one or the other
            self.live.pop(request, None)
            self.accept_paused_until = 0.0  # a descriptor was freed: accept again
            self.lock.notify_all()
        if waiting:
            self.waker.wake()
        self.on_change()

    # -- shutdown ---------------------------------------------------------

    def begin_shutdown(self, drain_timeout=None, stop_listening=False):
        """Stop accepting; serve() returns when the live connections are done.

        With STOP_LISTENING, new connects are refused at once (the
        listener is shut down and the socket file removed) rather than
        left waiting in the backlog.
        """
        if stop_listening:
            self.stop_listening()
        with self.lock:
            self.stopping.set()
            if drain_timeout is not None and self.drain_deadline is None:
                self.drain_deadline = deadline_in(drain_timeout)
        self.waker.wake()

    def abort_all(self, grace):
        """The bounded drain ran out: cut every live connection, then give them
        up to GRACE seconds to close and log their lines."""
        with self.lock:
            live = list(self.live.values())
        for connection in live:
            if connection is not None:  # None: not started; the exit closes it
                connection.abort("drain timeout")
        with self.lock:
            self.lock.wait_for(lambda: not self.live, grace)

    def server_close(self):
        super().server_close()
        self.waker.close()


def start_re_resolver(server):
    """-r: refresh SERVER's target list in a thread until its shutdown (not with -R).

    Once a second at most (RTIME_FLOOR).
    """
    period = server.options.rtime
    if server.options.re_resolve and 0 < period < float("inf"):  # "-r nan": never
        threading.Thread(target=_re_resolve, args=(server, max(period, RTIME_FLOOR)),
                         daemon=True).start()


def _re_resolve(server, period):
    """Every PERIOD seconds until SERVER stops; a failed look-up keeps the old list."""
    due = time.monotonic() + period
    while not server.stopping.wait(wait_length(due)):
        if time.monotonic() < due:
            continue  # a period longer than one wait
        try:
            fresh = resolve(server.options.target)
        except AddressError as e:
            log.warn(e.lines[0])
            fresh = None
        if fresh:
            server.targets = fresh  # replaced whole: a connection reads it once
        due = time.monotonic() + period

# ---------------------------------------------------------------------------
# 8. Metrics: the --metrics endpoint
# ---------------------------------------------------------------------------


# --metrics: a Prometheus endpoint, served by one thread of its own from a
# selector.  It reads the counters through Supervisor.metrics() (copies taken
# under the servers' locks) and shares nothing writable with the relays.

METRICS_TIMEOUT = 5.0    # --metrics: seconds from a socket's accept to its answer's last byte
METRICS_SOCKETS = 64     # --metrics: sockets open at once; a newcomer drops the oldest unanswered
METRICS_HEAD_MAX = 8192  # --metrics: bytes of request line and headers; a longer head is a 400
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_FORMAT = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# (name, type, help) of each metric family, in the order they are written.
METRIC_FAMILIES = (
    ("spiped_connections_total", "counter", "Connections accepted."),
    ("spiped_connections_live", "gauge", "Connections open now."),
    ("spiped_connections_refused_total", "counter",
     "Connections closed at accept: the peer is not in --allow."),
    ("spiped_bytes_total", "counter",
     "Plaintext bytes relayed, live connections included: in = source to target,"
     " out = target to source."),
    ("spiped_handshake_failures_total", "counter", "Handshakes that failed, by reason."),
    ("spiped_connect_failures_total", "counter", "Connections whose target could not be reached."),
    ("spiped_connection_limit_reached_total", "counter",
     "Accepted connections that took the last slot of -n."),
    ("spiped_key_handshakes_total", "counter", "Handshakes that succeeded, by key file."),
    ("spiped_tunnels", "gauge", "Tunnels served."),
    ("spiped_draining", "gauge", "1 once SIGTERM began the drain, else 0."),
    ("spiped_reloads_total", "counter", "Reloads (SIGHUP) begun."),
    ("spiped_reload_failures_total", "counter", "Reloads that changed nothing: the plan failed."),
    ("spiped_process_start_time_seconds", "gauge",
     "Start time of the process since the unix epoch."),
)


def _label_value(text):
    """TEXT escaped for a label value: backslash, double quote, newline."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _tunnel_samples(source, t):
    """(name, labels, value) of one tunnel's counters T (a Server.metrics() dict)."""
    tunnel = (("tunnel", source),)
    yield "spiped_connections_total", tunnel, t["total"]
    yield "spiped_connections_live", tunnel, t["live"]
    yield "spiped_connections_refused_total", tunnel, t["refused"]
    yield "spiped_bytes_total", tunnel + (("direction", "in"),), t["bytes_in"]
    yield "spiped_bytes_total", tunnel + (("direction", "out"),), t["bytes_out"]
    for reason, count in t["handshake_failures"].items():
        yield "spiped_handshake_failures_total", tunnel + (("reason", reason),), count
    yield "spiped_connect_failures_total", tunnel, t["connect_failures"]
    yield "spiped_connection_limit_reached_total", tunnel, t["limit_reached"]
    for key, count in t["keys"].items():
        yield "spiped_key_handshakes_total", tunnel + (("key", key),), count


def metric_samples(snapshot):
    """{family name: [(labels, value)]} from SNAPSHOT (a Supervisor.metrics() dict)."""
    samples = {name: [] for name, _, _ in METRIC_FAMILIES}
    for source, tunnel in snapshot["tunnels"].items():
        for name, labels, value in _tunnel_samples(source, tunnel):
            samples[name].append((labels, value))
    samples["spiped_tunnels"].append(((), len(snapshot["tunnels"])))
    samples["spiped_draining"].append(((), int(bool(snapshot["draining"]))))
    samples["spiped_reloads_total"].append(((), snapshot["reloads"]))
    samples["spiped_reload_failures_total"].append(((), snapshot["reload_failures"]))
    samples["spiped_process_start_time_seconds"].append(((), snapshot["started"]))
    return samples


def render_metrics(snapshot, openmetrics=False):
    """SNAPSHOT in Prometheus's text format 0.0.4, or OPENMETRICS text 1.0.0 (with # EOF)."""
    samples = metric_samples(snapshot)
    lines = []
    for name, kind, text in METRIC_FAMILIES:
        family = name[:-len("_total")] if openmetrics and kind == "counter" else name
        lines.append("# HELP %s %s" % (family, text.replace("\\", "\\\\").replace("\n", "\\n")))
        lines.append("# TYPE %s %s" % (family, kind))
        for labels, value in samples[name]:
            pairs = ",".join('%s="%s"' % (k, _label_value(v)) for k, v in labels)
            number = "%d" % value if isinstance(value, int) else repr(float(value))
            lines.append("%s%s %s" % (name, "{%s}" % pairs if pairs else "", number))
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def health(snapshot):
    """(HTTP status, body) for /healthz: 200 while every tunnel listens, else 503."""
    if snapshot["draining"]:
        return 503, "draining\n"
    down = [source for source, t in snapshot["tunnels"].items() if not t["listening"]]
    if down or not snapshot["tunnels"]:
        return 503, "not listening: %s\n" % " ".join(down)
    return 200, "ok\n"


# A request head: its request line, header lines, an empty line; each line
# ends in CRLF or a bare LF.  Only what a scraper sends is accepted.
# Patterns, not compiled ones: re compiles (and caches) each on first use, not at every start.
_HEAD_END = rb"\r?\n\r?\n"
_TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = r"(%s) ([\x21-\x7e]+) HTTP/1\.[0-9]\Z" % _TOKEN
_HEADER_LINE = r"(%s):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*\Z" % _TOKEN
HTTP_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 501: "Not Implemented",
                503: "Service Unavailable"}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_request_head(head):
    """(method, target, {lower-case header name: its first value}) of HEAD; None if malformed.

    HEAD is the bytes of a request up to and with its empty line.
    """
    lines = [line[:-1] if line.endswith("\r") else line
             for line in head.decode("latin-1").split("\n")]
    request = re.match(_REQUEST_LINE, lines[0])
    if request is None:
        return None
    headers = {}
    for line in lines[1:lines.index("", 1)]:
        header = re.match(_HEADER_LINE, line)
        if header is None:
            return None
        headers.setdefault(header.group(1).lower(), header.group(2))
    return request.group(1), request.group(2), headers


def http_date(when=None):
    """WHEN (default: now) as an HTTP Date header's value, in English whatever the locale."""
    t = time.gmtime(when)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
        t.tm_hour, t.tm_min, t.tm_sec)


def metrics_response(head, read):
    """The whole HTTP/1.0 response (bytes) to request HEAD (None: too long); READ() gives the numbers.

    GET /metrics or /healthz; another path is a 404, another method a 501,
    a malformed head a 400.  The connection closes after it.
    """
    request = parse_request_head(head) if head is not None else None
    kind = "text/plain; charset=utf-8"
    if request is None:
        status, body = 400, "bad request\n"
    elif request[0] != "GET":
        status, body = 501, "not implemented\n"
    else:
        path = request[1].partition("?")[0]
        if path == "/metrics":
            openmetrics = "application/openmetrics-text" in request[2].get("accept", "")
            status, body = 200, render_metrics(read(), openmetrics)
            kind = OPENMETRICS_FORMAT if openmetrics else TEXT_FORMAT
        elif path == "/healthz":
            status, body = health(read())
        else:
            status, body = 404, "not found\n"
    data = body.encode("utf-8")
    return ("HTTP/1.0 %d %s\r\nServer: spiped/%s\r\nDate: %s\r\nContent-Type: %s\r\n"
            "Content-Length: %d\r\n\r\n" % (status, HTTP_REASONS[status], __version__,
                                           http_date(), kind, len(data))).encode("latin-1") + data


class _MetricsClient:
    """One --metrics socket: what it sent so far, the answer left to write, its deadline."""

    __slots__ = ("sock", "deadline", "data", "answer")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.data = bytearray()
        self.answer = None  # a memoryview of what is left to write, once answered


class MetricsServer(ListeningServer):
    """--metrics on a TCP or unix address, READ() giving the numbers: one thread, one selector.

    ListeningServer binds; serve() replaces serve_forever(): it accepts,
    reads each request head, answers it and closes its socket, never
    waiting on any one socket.  The METRICS_* limits (see each) bound its
    sockets, their time and their heads: silent or trickling clients
    cannot keep a scraper out, and memory stays bounded whatever they do.
    """

    request_queue_size = METRICS_SOCKETS

    def __init__(self, family, sockaddr, read):
        self.read = read
        self.clients = {}  # socket -> its _MetricsClient, oldest first; serve()'s own
        self.thread = None
        self.closing = False  # set by close(), which then wakes serve()
        super().__init__(family, sockaddr, None)
        self.socket.setblocking(False)
        self.waker = _WakePipe()

    def serve(self):
        """Until close(): accept, read, answer, and cut what passed its deadline."""
        selector = selectors.DefaultSelector()
        selector.register(self.waker, selectors.EVENT_READ)
        selector.register(self.socket, selectors.EVENT_READ)
        paused_until = None  # out of descriptors: not accepting until then
        try:
            while not self.closing:
                now = time.monotonic()
                self._cut_late(selector, now)
                if paused_until is not None and now >= paused_until:
                    selector.register(self.socket, selectors.EVENT_READ)
                    paused_until = None
                wake_at = [paused_until] if paused_until is not None else []
                if self.clients:  # the oldest is the next to be cut
                    wake_at.append(next(iter(self.clients.values())).deadline)
                for key, _ in selector.select(min(wake_at) - now if wake_at else None):
                    if key.fileobj is self.waker:
                        self.waker.drain()
                    elif key.fileobj is self.socket:
                        if not self._accept(selector):  # rest a moment rather than spin
                            selector.unregister(self.socket)
                            paused_until = now + 0.25
                    elif key.fileobj in self.clients:  # not dropped earlier in this pass
                        self._step(selector, key.data)
        finally:
            for client in list(self.clients.values()):
                self._drop(selector, client)
            selector.close()

    def _cut_late(self, selector, now):
        """Drop the sockets past their deadline: the oldest, as each has the same time."""
        while self.clients:
            client = next(iter(self.clients.values()))
            if client.deadline > now:
                return
            self._drop(selector, client)

    def _accept(self, selector):
        """Take one waiting connection, if full dropping the oldest unanswered; False: out of fds."""
        try:
            sock, _ = self.socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return True
        except OSError:
            return False
        if len(self.clients) >= METRICS_SOCKETS:
            waiting = [client for client in self.clients.values() if client.answer is None]
            self._drop(selector, (waiting or list(self.clients.values()))[0])
        sock.setblocking(False)
        client = _MetricsClient(sock, time.monotonic() + METRICS_TIMEOUT)
        self.clients[sock] = client
        selector.register(sock, selectors.EVENT_READ, client)
        return True

    def _step(self, selector, client):
        """CLIENT's socket is ready: read its head and answer once it is whole; write on."""
        try:
            if client.answer is None:
                data = client.sock.recv(4096)
                if not data:  # gone before it asked
                    self._drop(selector, client)
                    return
                client.data += data
                end = re.search(_HEAD_END, client.data)
                if end is None and len(client.data) <= METRICS_HEAD_MAX:
                    return
                whole = end is not None and end.end() <= METRICS_HEAD_MAX
                head = bytes(client.data[:end.end()]) if whole else None
                client.answer = memoryview(metrics_response(head, self.read))
                selector.modify(client.sock, selectors.EVENT_WRITE, client)
            client.answer = client.answer[client.sock.send(client.answer):]
            if not client.answer:
                self._drop(selector, client)
        except (BlockingIOError, InterruptedError):
            pass
        except Exception as e:  # the client went away; or a bug, which must not end serve()
            if not isinstance(e, OSError):  # a scraper must not fill the log
                log.warn("metrics: %r" % (e,))
            self._drop(selector, client)

    def _drop(self, selector, client):
        """Close CLIENT's socket and forget it."""
        del self.clients[client.sock]
        selector.unregister(client.sock)
        client.sock.close()

    def start(self):
        """Serve in a thread of its own from now on."""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def close(self):
        """Stop serving, close every socket and remove a unix socket's file."""
        if self.thread is not None:
            self.closing = True
            self.waker.wake()
            self.thread.join()
        self.server_close()
        self.waker.close()

# ---------------------------------------------------------------------------
# 9. Process: daemonizing, pidfile, privileges, systemd, signals
# ---------------------------------------------------------------------------


def daemonize(pidfile):
    """Fork; the parent exits 0 once the child has setsid() and wrote PIDFILE.

    The parent exits 1 if the child could not write the pidfile.  stdio is
    kept, as C does.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        answer = b""
        try:
            answer = os.read(ready_r, 1)
        except OSError:
            pass
        os._exit(0 if answer == b"1" else 1)
    os.close(ready_r)
    os.setsid()
    try:
        fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        for line in pidfile_error(pidfile, e.strerror).lines:
            log.warn(line)
        os._exit(1)
    os.write(ready_w, b"1")
    os.close(ready_w)


def pidfile_error(pidfile, reason):
    """The SpipedError (C's lines) for a PIDFILE that cannot be written, for REASON."""
    return SpipedError("fopen(%s): %s" % (pidfile, reason), "Failed to daemonize")


def _privilege_error(*lines):
    """SpipedError: LINES, then C's closing line for -u."""
    return SpipedError(*lines, "Failed to drop privileges")


def look_up_ids(spec):
    """(uid or None, gid or None) for -u user, :group, or user:group.

    Names or numeric ids; the group is looked up first, as C does.
    """
    if not spec:
        raise _privilege_error('Need to specify user and/or group: "%s"' % spec)
    user, colon, group = spec.partition(":")
    if colon and not group:
        raise _privilege_error('Empty group name: "%s"' % spec)
    import grp  # late: only -u needs them
    import pwd
    gid = _lookup_id(group, lambda name: grp.getgrnam(name).gr_gid, "group")
    uid = _lookup_id(user, lambda name: pwd.getpwnam(name).pw_uid, "user")
    return uid, gid


def _lookup_id(name, look_up, what):
    """The id of user or group NAME (a name, or a number below 2^32); None for ''."""
    if not name:
        return None
    try:
        return look_up(name)
    except KeyError:
        if not (name.isdigit() and name.isascii() and int(name) < 1 << 32):
            raise _privilege_error("No such %s: %s" % (what, name)) from None
        return int(name)


def drop_privileges(uid, gid):
    """Clear supplementary groups, then become GID and UID (each if given)."""
    try:
        os.setgroups([])
    except OSError as e:
        raise SpipedError("Failed to drop privileges: %s" % e.strerror) from None
    for call, name, value in ((os.setgid, "setgid", gid), (os.setuid, "setuid", uid)):
        if value is None:
            continue
        try:
            call(value)
        except (OSError, OverflowError) as e:
            why = getattr(e, "strerror", None) or os.strerror(errno.EINVAL)
            raise _privilege_error("%s(%d): %s" % (name, value, why)) from None


class Notifier:
    """systemd's notify protocol (READY, STATUS, STOPPING, WATCHDOG), stdlib only.

    With NOTIFY_SOCKET set, the datagram socket is made once, here, at
    start-up: a status line sent after each accept() then needs no
    descriptor of its own, so it never takes the last free one from the
    connection being set up (a daemon at its RLIMIT_NOFILE).
    """

    def __init__(self, environ=os.environ):
        self.address = None
        self.sock = None
        self.watchdog = None
        path = environ.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        usec = environ.get("WATCHDOG_USEC", "")
        wpid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog = int(usec) / 2e6
        self.next_ping = 0.0
        self.last_status = None
        if self.address is not None:
            try:
                self._socket()
            except OSError:
                pass  # send() tries again

    def _socket(self):
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        return self.sock

    def send(self, text):
        """Send one notify message; never blocks (a full queue drops it)."""
        if self.address is None:
            return
        try:
            self._socket().sendto(text.encode(), socket.MSG_DONTWAIT, self.address)
        except OSError:
            pass

    def reloading(self):
        """RELOADING=1 with the monotonic clock, before a reload (READY=1 ends it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1\nMONOTONIC_USEC=%d" % usec)

    def status(self, text):
        if text != self.last_status:
            self.last_status = text
            self.send("STATUS=" + text)

    def tick(self):
        if self.watchdog and time.monotonic() >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = time.monotonic() + self.watchdog


def warm_up():
    """Use once, while every file is still readable, what connections load on first use.

    After -u the interpreter may no longer read its own library (a pyenv
    or venv under /root, mode 0700), and Cryptodome imports its cipher
    modes, and getaddrinfo() its name codec, only when first used.
    """
    key = nonce = bytes(32)
    exponent, y = dh_keypair(False)
    traffic_keys(key, nonce, nonce, dh_shared(exponent, y))
    check_dh_message(y + hmac_sha256(dhmac_keys(key, nonce, nonce)[0], y),
                     dhmac_keys(key, nonce, nonce)[0], True)
    PacketOpener(key, key).feed(PacketSealer(key, key).seal(b"warm-up"))
    _poller().close()
    "localhost".encode("idna")


def _limit_malloc_arenas(count=2):
    """Keep glibc from giving each busy thread a malloc arena of its own.

    With one arena per thread, memory freed by one connection is not
    reused by the next, and a few hundred threads hold tens of MiB.
    """
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-8, count)  # M_ARENA_MAX
    except (ImportError, OSError, AttributeError):
        pass


def set_signals(handlers):
    """Install HANDLERS ({signal number: handler}): the one place that does."""
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # install_signals()'s


def install_signals(supervisor, socket_files=lambda: ()):
    """Handlers only record the signal and wake SUPERVISOR's loop, which acts.

    SIGTERM drains.  A second one ends the process at once, killed by
    SIGTERM as C is, whatever the loop is doing: its handler only removes
    the files of SOCKET_FILES() (the pidfile stays, as in C).  SIGINT keeps
    its default (as PID 1, where defaults do nothing: exit 0, and a
    second SIGTERM too).  SIGUSR1 logs statistics.  SIGHUP (C would exit)
    reloads the keys, and with --config the file.
    """
    pid1 = os.getpid() == 1
    terms = []  # SIGTERMs seen

    def record(what):
        supervisor.signals.append(what)
        supervisor.waker.wake()

    def on_term(signum, frame):
        terms.append(signum)
        if len(terms) == 1:
            record("term")
            return
        for socket_file in socket_files():
            socket_file.remove()
        if pid1:
            os._exit(0)
        set_signals({signal.SIGTERM: signal.SIG_DFL})
        os.kill(os.getpid(), signal.SIGTERM)

    handlers = {signal.SIGTERM: on_term,
                signal.SIGUSR1: lambda signum, frame: record("stats"),
                signal.SIGHUP: lambda signum, frame: record("reload"),
                signal.SIGINT: signal.SIG_DFL}
    if pid1:
        log.warn("WARNING: Applying workaround for Docker signal-handling bug")
        handlers[signal.SIGINT] = lambda signum, frame: os._exit(0)
    set_signals(handlers)

# ---------------------------------------------------------------------------
# 10. Supervisor: the tunnels of the process, kept in step with their plan
# ---------------------------------------------------------------------------


class KeyFiles:
    """The key files of one tunnel: -k first, then each --accept-key.

    load() reads them into a key ring, at the start and again at each
    reload.  A key read from stdin (-k -) cannot be read again: its first
    reading is kept.
    """

    def __init__(self, paths):
        self.paths = list(paths)
        names = ["stdin" if p == "-" else os.path.basename(p.rstrip("/")) or p
                 for p in self.paths]
        if len(set(names)) != len(names):  # names for logs: base names unless two clash
            names = ["stdin" if p == "-" else p for p in self.paths]
        self.names = names
        self.stdin_key = None

    def load(self):
        """The key ring ((name, K), ...); read_key()'s errors (C's lines) propagate.

        A reload judges the files as the start does: an empty or short file
        is read with read_key()'s warning, as C reads it.
        """
        ring = []
        for path, name in zip(self.paths, self.names):
            if path == "-" and self.stdin_key is not None:
                key = self.stdin_key
            else:
                key = read_key(path)
                if path == "-":
                    self.stdin_key = key
            ring.append((name, key))
        return tuple(ring)


def _count_keys(n):
    return "%d key%s" % (n, "" if n == 1 else "s")


class TunnelSpec(NamedTuple):
    """One tunnel, checked and resolved, not yet bound: what build_tunnel() made."""

    options: "TunnelOptions"
    family: int
    sockaddr: object          # the source address to bind (or a passed socket's)
    targets: tuple            # the target's (family, sockaddr) pairs, in order
    bind: object              # -b's sockaddr, or None
    keyring: tuple            # ((name, K), ...), -k first
    label: str = ""           # before its log lines: "SOURCE: " with --config
    where: str = ""           # before its errors: "FILE:LINE: " with --config
    line: int = 0             # its line in a --config file
    more_sources: tuple = ()  # the source's other addresses (--all-addresses)


def build_tunnel(options, key_files, retry=False, listener=None, **names):
    """Resolve the addresses and read the keys (KEY_FILES) of tunnel OPTIONS.

    RETRY (-D) retries failed look-ups each second.  With LISTENER (a
    socket systemd passed) the source is that socket, not looked up.
    NAMES: the TunnelSpec's label, where and line.  Raises SpipedError with
    C's messages, after the spec's where.
    """
    try:
        if listener is None:
            sources = _unique(_resolve_or_retry(options.source, retry))
            if len(sources) > 1 and not options.all_addresses:
                log.warn("Using the first of multiple addresses found for %s" % options.source)
                sources = sources[:1]
        else:
            sources = [(listener.family, listener.getsockname())]
        (family, sockaddr), names["more_sources"] = sources[0], tuple(sources[1:])
        targets = _resolve_or_retry(options.target, retry)
        if not targets:
            raise SpipedError("No addresses found for %s" % options.target)
        bind = None
        if options.bind is not None:
            bind = _resolve_or_retry(options.bind, retry, bind_address)[0][1]
        keyring = key_files.load()
    except SpipedError as e:
        raise e.located(names.get("where", "")) from None
    return TunnelSpec(options, family, sockaddr, tuple(targets), bind, keyring, **names)


def parse_config_file(path):
    """[(line number, TunnelOptions)] for the tunnels in --config file PATH.

    Each line is split as a POSIX shell would and parsed by
    parse_spiped_args; blank and comment lines are skipped.  Raises
    SpipedError naming PATH:LINE.
    """
    import shlex  # late: only --config needs it
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise SpipedError("Cannot read %s: %s" % (path, e.strerror)) from None
    except UnicodeDecodeError as e:
        raise SpipedError("%s: not UTF-8 text: %s" % (path, e.reason)) from None
    tunnels = []
    for number, line in enumerate(text.splitlines(), 1):
        where = "%s:%d: " % (path, number)
        try:
            args = shlex.split(line, comments=True)
            if not args:
                continue
            options = parse_spiped_args(args, tunnel_line=True)
        except ValueError as e:  # shlex
            raise SpipedError(where + str(e)) from None
        except UsageError as e:
            raise SpipedError(where + e.why) from None
        except SpipedError as e:
            raise e.located(where) from None
        if "-" in options.key_paths():
            raise SpipedError(where + "a key from stdin (-) cannot be read again at a reload;"
                              " name a key file")
        tunnels.append((number, options))
    return tunnels


class TunnelDiff(NamedTuple):
    """Sources that differ between two tunnel sets (diff_tunnels()); equal lines are in none."""

    added: list      # only in the new set
    removed: list    # only in the old set
    rekeyed: list    # in both, differing only in key options (-k, --accept-key) or the keys
    replaced: list   # in both, differing in anything else


class TunnelChanges(NamedTuple):
    """What a reload will do (Supervisor._plan_reload()), before anything is done."""

    specs: dict        # source -> TunnelSpec: the whole new set
    added: dict        # source -> its Server, bound, not yet serving
    removed: list      # sources that stop listening and drain
    rekeyed: list      # sources whose new connections take new keys
    taking_over: dict  # source -> the source whose listening socket it takes over
    unchanged: int     # lines left as they are


def diff_tunnels(old, new):
    """The TunnelDiff that turns tunnel set OLD into NEW; both map source -> (options, keys)."""
    added = [source for source in new if source not in old]
    removed = [source for source in old if source not in new]
    rekeyed, replaced = [], []
    for source in new:
        if source in old and old[source] != new[source]:
            if old[source][0].without_keys() == new[source][0].without_keys():
                rekeyed.append(source)
            else:
                replaced.append(source)
    return TunnelDiff(added, removed, rekeyed, replaced)


class CommandLine:
    """The plan of spiped's command line: one tunnel; a reload re-reads its keys only."""

    name = "the command line"

    def __init__(self, options, listener=None):
        self.options = options
        self.listener = listener  # a socket systemd passed: the source is not looked up
        self.key_files = KeyFiles(options.key_paths())
        self.spec = None

    def load(self, retry=False):
        """{source: TunnelSpec}: resolved the first time; later only the keys are read."""
        if self.spec is None:
            self.spec = build_tunnel(self.options, self.key_files, retry, self.listener)
        else:
            self.spec = self.spec._replace(keyring=self.key_files.load())
        return {self.options.source: self.spec}

    def files(self, specs):
        """The files a reload reads (--watch's): the key files, stdin's not."""
        return [p for p in self.key_files.paths if p != "-"]

    def status(self, servers):
        return "%d live, %d total connections" % servers[self.options.source].stats.counts()

    def reload_failed(self, error):
        log.warn("Key reload failed, still using the %s loaded before: %s"
                 % (_count_keys(len(self.spec.keyring)), error.lines[0]))

    def rekeyed(self, source, spec):
        pass  # reloaded() says it

    def reloaded(self, counts):
        kept = ""
        if "-" in self.key_files.paths:
            kept = " (the key from stdin is kept: stdin cannot be read again)"
        log.event("reloaded %s%s" % (_count_keys(len(self.spec.keyring)), kept))


class ConfigFile:
    """The plan of a --config file: a tunnel per line; a reload reads it all again."""

    def __init__(self, path):
        self.path = self.name = path

    def read(self):
        """parse_config_file(); a file with no tunnel at all is an error too."""
        tunnels = parse_config_file(self.path)
        if not tunnels:
            raise SpipedError("%s: no tunnels: the file holds only blank lines and comments"
                              % self.path)
        return tunnels

    def load(self, retry=False):
        """{source: TunnelSpec} for every line; a source used twice is an error."""
        specs, lines = {}, {}  # lines: source or address_key -> its line
        for number, options in self.read():
            where = "%s:%d: " % (self.path, number)
            spec = build_tunnel(options, KeyFiles(options.key_paths()), retry,
                                label="%s: " % options.source, where=where, line=number)
            address = address_key(spec.family, spec.sockaddr)
            other = lines.get(options.source, lines.get(address))
            if other is not None:
                raise SpipedError(where + "source %s is already used on line %d"
                                  % (options.source, other))
            lines[options.source] = lines[address] = number
            specs[options.source] = spec
        return specs

    def files(self, specs):
        """The files a reload reads (--watch's): FILE, then each tunnel's key files, once."""
        files = [self.path]
        for spec in specs.values():
            files += [p for p in spec.options.key_paths() if p not in files]
        return files

    def status(self, servers):
        return "%d tunnels: %s" % (len(servers), "; ".join(
            "%s %d live, %d total" % ((source,) + server.stats.counts())
            for source, server in servers.items()))

    def reload_failed(self, error):
        for line in error.lines:
            log.warn(line)
        log.warn("%s not reloaded; still serving as before" % self.path)

    def rekeyed(self, source, spec):
        log.event("%s: reloaded %s" % (source, _count_keys(len(spec.keyring))))

    def reloaded(self, counts):
        log.warn("%s reloaded: %s" % (self.path, ", ".join(
            "%d %s" % (number, what) for what, number in counts.items())))


WATCH_INTERVAL = 2.0  # --watch: seconds from one look at the files to the next


class FileWatch:
    """--watch: which files changed since they were last read, once they hold still.

    A file is known by what its path resolves to, symlinks followed: the
    device, inode, size, mtime and ctime (None while it is missing).  So a
    file renamed into place shows, and so does a Kubernetes Secret's new
    folder behind its swapped ..data link.  Any bytes make a valid key, so
    a change is taken only once one more look finds every file as the look
    before it: a file still being written in place is not.
    """

    def __init__(self, interval):
        self.interval = interval
        self.seen = {}   # path -> identity when it was last read
        self.last = {}   # path -> identity at the previous look
        self.taken = {}  # the look that reported a change, until watch() is called
        self.next_look = time.monotonic() + interval

    @staticmethod
    def identity(path):
        """What PATH resolves to, as a comparable tuple; None if it cannot be stat()ed."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def watch(self, paths):
        """Watch PATHS from now on, as just read: as the look that reported a change saw them."""
        self.seen = {p: self.taken[p] if p in self.taken else self.identity(p) for p in paths}
        self.last, self.taken = dict(self.seen), {}

    def wait(self):
        """Seconds until the next look."""
        return max(0.0, self.next_look - time.monotonic())

    def look(self):
        """The paths that changed and then held still for one look, once a look is due; else []."""
        if self.wait() > 0:
            return []
        self.next_look = time.monotonic() + self.interval
        now = {p: self.identity(p) for p in self.seen}
        settled, self.last = now == self.last, now
        changed = [p for p in now if now[p] != self.seen[p]]
        if not (changed and settled):
            return []
        self.seen = self.taken = now  # reported once: a failed reload waits for the next change
        log.event("%s changed: reloading" % ", ".join(changed))
        return changed


def explained(error, user):
    """ERROR, saying why a file is unreadable now if -u USER dropped privileges."""
    if user is None:
        return error
    hint = (" after -u %s (make the file readable by that user or its group,"
            " or restart spiped to read it as root)" % user)
    return SpipedError(*(line + hint if line.endswith("Permission denied") else line
                         for line in error.lines))


class Supervisor:
    """The supervisor: serves the tunnels of its PLAN and keeps them in step with it.

    PLAN (a CommandLine or a ConfigFile) says which tunnels there are and
    how to speak of them.  The main thread owns this object and runs run():
    signal handlers record in .signals and wake it, and it acts on them
    for the whole process.  Each Server serves in a thread of its own; a
    server leaving (its line was removed or replaced) drains there and is
    forgotten once closed.  A server's thread ending wakes the loop too.
    """

    def __init__(self, plan, drain_timeout=None, passed=(), user=None, watch=None):
        self.plan = plan
        self.file_watch = watch  # a FileWatch (--watch), or None
        self.drain_timeout = drain_timeout
        self.user = user     # -u: files are read again as this user
        self.specs = {}      # source -> TunnelSpec being served
        self.servers = {}    # source -> Server accepting for it
        self.threads = {}    # Server -> its thread, leaving servers too
        self.finished = []   # servers whose threads are ending (appended by those threads)
        self.passed = {address_key(sock.family, sock.getsockname()): sock for sock in passed}
        self.signals = []    # appended by signal handlers, consumed by run()
        self.stopping = False
        self.tick = 1.0
        self.watching = False  # systemd wants STATUS: wake after each accept and close
        self.waker = _WakePipe()
        self.started = time.time()
        self.reloads = self.reload_failures = 0  # read by metrics(), from any thread

    def _counts_changed(self):
        if self.watching:
            self.waker.wake()

    def check_passed(self, specs):
        """SpipedError unless every passed socket is the source of a tunnel of SPECS."""
        wanted = {address_key(spec.family, spec.sockaddr) for spec in specs.values()}
        for address, sock in self.passed.items():
            if address not in wanted:
                raise SpipedError("Inherited file descriptor %d (%s) is the source of no"
                                  " tunnel in %s" % (sock.fileno(), format_sockaddr(
                                      sock.family, sock.getsockname()), self.plan.name))

    def _start(self, spec, listeners=None):
        """A Server for SPEC, bound now or serving LISTENERS; SpipedError if it cannot bind."""
        try:
            return Server(spec, listeners, self._counts_changed)
        except OSError as e:
            raise SpipedError("Error binding socket: %s" % e.strerror) from None

    def bind(self, specs):
        """Bind every tunnel of SPECS (to its passed socket if any), or none."""
        servers = {}
        for source, spec in specs.items():
            passed = self.passed.get(address_key(spec.family, spec.sockaddr))
            try:
                servers[source] = self._start(spec, passed and [passed.dup()])
            except SpipedError as e:
                for server in servers.values():
                    server.server_close()
                raise e.located(spec.where) from None
        return servers

    def serve(self, specs, servers):
        """Start serving SERVERS (from bind()) for SPECS, each in a thread."""
        for source, server in servers.items():
            self.specs[source] = specs[source]
            self.servers[source] = server
            thread = threading.Thread(target=self._serve, args=(server,), daemon=True)
            self.threads[server] = thread
            thread.start()
            start_re_resolver(server)

    def _serve(self, server):
        try:
            server.serve(tick=self.tick)
        except Exception as e:  # a bug must not pass silently
            log.warn("%sserver stopped: %r" % (server.label, e))
        finally:
            server.server_close()
            self.finished.append(server)
            self.waker.wake()

    def _retire(self, server, stop_listening):
        """SERVER stops accepting and drains in its thread; STOP_LISTENING: refuse at once.

        A socket systemd passed is left listening, to systemd.
        """
        passed = address_key(server.address_family, server.server_address) in self.passed
        server.begin_shutdown(self.drain_timeout, stop_listening and not passed)

    def _replace(self, old_source, source, spec):
        """A new Server for SPEC takes over OLD_SOURCE's listening socket; the old one drains.

        The new one is returned, not yet serving; None (logged) if it cannot be made.
        """
        old = self.servers[old_source]
        try:
            server = self._start(spec, [sock.dup() for sock in old.listening_sockets()])
        except (OSError, SpipedError) as e:
            log.warn("%s%s: not replaced: %s" % (spec.where, source, e))
            return None
        server.adopt_socket_file(old.release_socket_file())
        del self.servers[old_source], self.specs[old_source]
        self._retire(old, stop_listening=False)
        return server

    def _moved(self, specs, added, removed):
        """{added source: removed source} of added lines bound where a removed one was."""
        where = {address_key(self.specs[s].family, self.specs[s].sockaddr): s for s in removed}
        moved = {}
        for source in added:
            old = where.get(address_key(specs[source].family, specs[source].sockaddr))
            if old is not None:
                moved[source] = old
        return moved

    def reload(self):
        """SIGHUP: load the plan again, apply the changes, and report them.

        A plan that fails its checks, or a new source that cannot be bound,
        changes nothing; the plan says why.
        """
        self.reloads += 1
        try:
            changes = self._plan_reload()
        except SpipedError as e:
            self.reload_failures += 1
            self.plan.reload_failed(explained(e, self.user))
            return
        self.plan.reloaded(self._apply(changes))

    def _plan_reload(self):
        """The TunnelChanges from what is served to the plan loaded again; SpipedError.

        A line whose source text changed but names the same address as a
        removed line takes over that line's listening socket, like a
        changed line.  Added lines are bound here, so a failure changes nothing.
        """
        specs = self.plan.load()
        self.check_passed(specs)
        diff = diff_tunnels({s: (spec.options, spec.keyring) for s, spec in self.specs.items()},
                            {s: (spec.options, spec.keyring) for s, spec in specs.items()})
        moved = self._moved(specs, diff.added, diff.removed)
        taking_over = {s: s for s in diff.replaced}
        taking_over.update(moved)
        return TunnelChanges(
            specs=specs, taking_over=taking_over, rekeyed=diff.rekeyed,
            added=self.bind({s: specs[s] for s in diff.added if s not in moved}),
            removed=[s for s in diff.removed if s not in moved.values()],
            unchanged=len(specs) - len(diff.added) - len(diff.rekeyed) - len(diff.replaced))

    def _apply(self, changes):
        """Carry out CHANGES (from _plan_reload()); the tunnels it added, removed, rekeyed,
        replaced and left alone, as {what: how many} in that order, to report."""
        fresh, replaced = dict(changes.added), 0
        for source, old_source in changes.taking_over.items():
            server = self._replace(old_source, source, changes.specs[source])
            if server is not None:
                fresh[source] = server
                replaced += 1
        for source in changes.rekeyed:  # connections read the key ring once, as they start
            self.servers[source].set_keyring(changes.specs[source].keyring)
            self.specs[source] = changes.specs[source]
            self.plan.rekeyed(source, changes.specs[source])
        for source in changes.removed:
            self._retire(self.servers.pop(source), stop_listening=True)
            del self.specs[source]
        self.serve(changes.specs, fresh)
        return dict(added=len(changes.added), removed=len(changes.removed),
                    rekeyed=len(changes.rekeyed), replaced=replaced, unchanged=changes.unchanged)

    def metrics(self):
        """For --metrics, from any thread: each tunnel's Server.metrics(), the process's counts."""
        servers = dict(self.servers)  # one copy: the main thread may replace entries
        tunnels = {source: dict(server.metrics(), listening=server.fileno() >= 0
                                and not self.stopping) for source, server in servers.items()}
        return {"tunnels": tunnels,
                "reloads": self.reloads, "reload_failures": self.reload_failures,
                "draining": self.stopping, "started": self.started}

    def shutdown(self):
        """SIGTERM: every server drains, refusing new connects at once as a removed line does.

        Servers that left at a reload already drain.
        """
        self.stopping = True
        for server in self.servers.values():
            self._retire(server, stop_listening=True)

    def socket_files(self):
        """The SocketFile of each unix source we bound and still own (none of systemd's)."""
        return [server.socket_file for server in list(self.threads)
                if server.socket_file is not None]

    def reap(self):
        """Forget servers whose threads ended; True once all have after shutdown()."""
        while self.finished:
            self.threads.pop(self.finished.pop()).join()
        return self.stopping and not self.threads

    def run(self, notifier):
        """Act on recorded signals and --watch's changes until SIGTERM's drain has ended."""
        self.watching = notifier.address is not None
        selector = selectors.DefaultSelector()
        selector.register(self.waker, selectors.EVENT_READ)
        try:
            while not self.reap():
                notifier.tick()
                notifier.status(self.plan.status(self.servers))
                watch = self.file_watch
                if selector.select(min(self.tick, watch.wait()) if watch else self.tick):
                    self.waker.drain()
                if watch and not self.stopping and watch.look():
                    self.signals.append("reload")
                while self.signals:
                    self._act(self.signals.pop(0), notifier)
        finally:
            selector.close()

    def _act(self, what, notifier):
        """One recorded signal: "term", "reload" or "stats"."""
        if what == "term" and not self.stopping:
            notifier.send("STOPPING=1")
            self.shutdown()
        elif what == "reload" and not self.stopping:
            notifier.reloading()
            self.reload()
            self.watch_files(self.specs)  # a --config reload may name other files
            notifier.send("READY=1")
        elif what == "stats":  # a line per tunnel, after its label ("SOURCE: " with --config)
            for server in self.servers.values():
                log.event(server.label + Stats.line(server.metrics()))

    def watch_files(self, specs):
        """--watch: watch the files the plan read for SPECS, as just read."""
        if self.file_watch is not None:
            self.file_watch.watch(self.plan.files(specs))

# ---------------------------------------------------------------------------
# 11. Command line and main()
# ---------------------------------------------------------------------------


SPIPED_USAGE = """\
usage: spiped {-e | -d} -s <source socket> -t <target socket> -k <key file>
    [-b <bind address> [-DFj] [-f | -g] [-n <max # connections>]
    [-o <connection timeout>] [-p <pidfile>] [-r <rtime> | -R] [--syslog]
    [-u {<username> | <:groupname> | <username:groupname>}]
       spiped -v
"""

SPIPE_USAGE = """\
usage: spipe -t <target socket> -k <key file> [-b <bind address>] [-f | -g]
    [-j] [-o <connection timeout>]
       spipe -v
"""

# --help: the usage, a line for each of C's options with its default, then
# the extensions.  (The usage alone, C's text, is what an error prints.)
SPIPED_OPTIONS_HELP = """\
Options:
  -e                     encrypt: accept plaintext connections on SOURCE and
                         carry them encrypted to TARGET (a spiped -d)
  -d                     decrypt: accept encrypted connections on SOURCE (from
                         a spiped -e or spipe) and carry their plaintext to
                         TARGET
  -s SOURCE              the address to listen on: [IPv4]:port, [IPv6]:port,
                         host:port (the first address the name has) or
                         /path/to/unix.socket
  -t TARGET              the address to connect to, in the same forms; each
                         address of a name is tried in turn
  -k KEYFILE             the shared key: the SHA-256 of the whole file; "-"
                         reads it from stdin
  -b ADDRESS             bind outgoing connections to ADDRESS, port 0 unless
                         given (default: the system picks)
  -D                     daemonize (unless -F) before resolving addresses;
                         retry a failed look-up every second (default: exit 1)
  -F                     stay in the foreground and write no pidfile
                         (default: fork into the background once listening)
  -j                     turn SO_KEEPALIVE off (default: on)
  -f                     skip the Diffie-Hellman exchange: quicker set-up, no
                         forward secrecy (default: exchange)
  -g                     require forward secrecy: refuse a peer that uses -f
  -n MAX                 at most MAX connections at once (default %(maxconn)d;
                         0: no limit)
  -o SECS                time limit to connect to TARGET, and again for the
                         handshake (default %(timeout)g; 0: the default;
                         inf: none)
  -p PIDFILE             where the daemon writes its PID (default: SOURCE.pid
                         in the current directory)
  -r SECS                look TARGET's name up again every SECS seconds
                         (default %(rtime)g; 0: the default)
  -R                     never look TARGET's name up again
  -u USER[:GROUP]        once bound, switch to USER, :GROUP or USER:GROUP
                         (names or numeric ids; default: stay as started)
  -v                     print the version and exit
  --syslog               once in the background, log to syslog instead of
                         stderr; with -F, connection logs and statistics only
""" % {"maxconn": DEFAULT_MAXCONN, "timeout": DEFAULT_TIMEOUT, "rtime": DEFAULT_RTIME}

SPIPED_LONG_HELP = """\
Extensions (long options; every C command line keeps its meaning):
  --log-connections      log each connection: accepted, connect or handshake
                         failure, closed with byte counts and duration
  --drain-timeout SECS   after SIGTERM wait at most SECS for live connections,
                         then close them and exit 0
  --log-label TEXT       start every log line with "TEXT: " (after the
                         program name), to tell several daemons apart
  --socket-mode MODE     octal permissions for a unix source socket
  --all-addresses        listen on every address the -s name resolves to
                         (localhost: 127.0.0.1 and ::1), not only the first;
                         one -n limit and one set of statistics for all
  --accept-key FILE      (-d only; may repeat) also accept clients that use
                         the key in FILE; answer each with the key it used
  --proxy-protocol 1|2   before any other byte, send the target a PROXY
                         protocol header (HAProxy's version 1 text or
                         version 2 binary) naming the accepted connection's
                         peer and local address: with -e the plaintext
                         client (sealed as the first data), with -d the -e
                         host
  --connect-after-auth   -d only: connect to the target only once the
                         client's handshake message proved it has the key
  --config FILE          serve every tunnel in FILE, one per line written as
                         its spiped options (-e|-d -s -t -k ...), with blank
                         lines and # comments; the command line then holds
                         only process options (-D -F -p -u --syslog
                         --drain-timeout --log-label --check --metrics
                         --watch --watch-interval).  The default pidfile
                         is FILE.pid.  SIGHUP re-reads FILE and the key
                         files: added lines start, removed lines stop
                         listening and drain, lines whose only change is a
                         key (-k, --accept-key) take the new keys for new
                         connections, other changed lines restart
  --keepalive IDLE[,INTERVAL[,COUNT]]
                         TCP keepalive (seconds) on both sockets of each
                         connection: the first probe after IDLE idle
                         seconds (Linux's default: 2 hours), then one every
                         INTERVAL (default IDLE); COUNT (default 3) probes
                         unanswered drop the connection.  Not with -j.
                         Also TCP_USER_TIMEOUT of IDLE + INTERVAL x COUNT:
                         unacknowledged data, or a peer that reads nothing,
                         for that long drops the connection too
  --allow CIDR[,CIDR...] serve only TCP peers in these networks (IPv4 or
                         IPv6; a bare address is one host; may repeat);
                         others are closed at accept, before any byte,
                         counted (refused) and logged at most once a minute
                         per source.  Not with a unix source; never applies
                         to --metrics
  --check                check the command line or --config FILE and exit:
                         parse, resolve every address once (-D does not
                         retry), read every key, look up -u, and check that
                         the pidfile (without -F) and unix sources could be
                         made; bind nothing.  Prints "SOURCE -> TARGET: ok,
                         N keys" per tunnel and exits 0, or a start's
                         errors and exit 1
  --watch                every 2 seconds look at the key files (and --config
                         FILE) through their symlinks; when one changed and
                         then held still for one more look, reload as
                         SIGHUP does (a Kubernetes Secret's swapped folder
                         is seen too).  Not the key from stdin (-k -)
  --watch-interval SECS  --watch, looking every SECS seconds
  --metrics ADDRESS      serve HTTP on ADDRESS ([host]:port, host:port or
                         /unix/path): GET /metrics gives each tunnel's
                         counters (label tunnel="<-s>") in Prometheus's text
                         format, GET /healthz 200 "ok" while every tunnel
                         listens, 503 while draining or when one does not
  --help                 this text
Signals: SIGTERM drains then exits 0 (a second one exits at once); SIGUSR1
logs one statistics line (one per tunnel with --config).  systemd: socket
activation (LISTEN_FDS) and readiness (NOTIFY_SOCKET, WATCHDOG_USEC) are
used when present.
SIGHUP (C spiped would exit) re-reads -k and every --accept-key file (with
--config, the file and every tunnel's key files): new connections use the
new keys, live ones keep theirs; if a file cannot be read, nothing changes.
"""

SPIPE_OPTIONS_HELP = """\
Options:
  -t TARGET              the spiped -d to connect to: [IPv4]:port,
                         [IPv6]:port, host:port or /path/to/unix.socket; each
                         address of a name is tried in turn
  -k KEYFILE             the shared key: the SHA-256 of the whole file; "-"
                         reads it from stdin, leaving nothing to send
  -b ADDRESS             bind the connection to ADDRESS, port 0 unless given
                         (default: the system picks)
  -f                     skip the Diffie-Hellman exchange: quicker set-up, no
                         forward secrecy (default: exchange)
  -g                     require forward secrecy: refuse a server that uses -f
  -j                     turn SO_KEEPALIVE off (default: on)
  -o SECS                time limit to connect, and again for the handshake
                         (default %(timeout)g; 0: the default; inf: none)
  -v                     print the version and exit
""" % {"timeout": DEFAULT_TIMEOUT}

SPIPE_LONG_HELP = """\
Extensions (long options; every C command line keeps its meaning):
  --help                 this text
stdin goes to the target encrypted, the target's replies come out on stdout;
spipe exits (status 0) when the server side closes.
"""

SPIPED_HELP = SPIPED_USAGE + "\n" + SPIPED_OPTIONS_HELP + "\n" + SPIPED_LONG_HELP
SPIPE_HELP = SPIPE_USAGE + "\n" + SPIPE_OPTIONS_HELP + "\n" + SPIPE_LONG_HELP

# The one long option C spiped has: its errors stay C's, as every short
# option's do.  Every other long option is an extension, whose errors name
# it and say what is wrong before the usage text.
C_LONG_OPTIONS = ("--syslog",)


def _is_extension(option):
    """True for an option C spiped does not have."""
    return option.startswith("--") and option not in C_LONG_OPTIONS


def _misused(option, reason):
    """The UsageError for OPTION used wrongly: "OPTION: REASON".

    An extension prints it before the usage text; for C's own options C
    prints the usage alone, so the reason is only the why of a --config
    line.
    """
    text = "%s: %s" % (option, reason)
    return UsageError(text) if _is_extension(option) else UsageError(why=text)


class _Exit(Exception):
    """Leave main() with this status (after messages were printed)."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


def getopt_c(args, flags, with_arg, long_flags=(), long_with_arg=()):
    """Yield (option, value) left to right, the way spiped's getopt does.

    Single-letter flags may be grouped, arguments attached or separate,
    '--' ends the options.  Long options may take '=value'.  Raises
    UsageError; the caller's loop sees each option as it comes, so -v can
    act before later errors.  The leftover arguments are yielded last as
    (None, list).
    """
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in long_flags and not eq:
                yield name, None
            elif name in long_with_arg:
                if not eq:
                    i += 1
                    if i >= len(args):
                        raise _misused(name, "needs an argument")
                    value = args[i]
                yield name, value
            elif name in long_flags and _is_extension(name):
                raise _misused(name, "takes no argument")
            else:
                raise UsageError("illegal option -- %s" % name)
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            break
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            if letter in with_arg:
                value = arg[pos + 1:]
                if not value:
                    i += 1
                    if i >= len(args):
                        raise UsageError("Missing argument to -%s" % letter)
                    value = args[i]
                yield "-" + letter, value
                break
            if letter not in flags:
                raise UsageError("illegal option -- -%s" % letter)
            yield "-" + letter, None
            pos += 1
        i += 1
    yield None, args[i:]


_STRTOD = (  # a pattern: compiled on first use (re caches it), not at every start
    r"[ \t\n\r\f\v]*[+-]?(?:"
    r"0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?"
    r"|[nN][aA][nN](?:\([0-9A-Za-z_]*\))?)\Z")


def _strtod(text):
    """C strtod() on the whole of TEXT: a float, None (not a number) or 'range'."""
    if not re.match(_STRTOD, text):
        return None
    s = text.lstrip(" \t\n\r\f\v")
    body = s.lstrip("+-").lower()
    if body.startswith("nan"):
        return float("nan")
    if body.startswith("inf"):
        return float(s[:1] + "inf") if s[:1] == "-" else float("inf")
    value = float.fromhex(s) if body.startswith("0x") else float(s)
    if value in (float("inf"), float("-inf")):
        return "range"  # overflow, as strtod reports it
    if value == 0 and any(c in "123456789abcdef" for c in body.split("p")[0].split("e")[0].replace("0x", "", 1)):
        return "range"  # underflow
    return value


def _strtoul(text):
    """C strtoul(base 0) on the whole of TEXT: value, or None, or 'range'."""
    s = text.lstrip(" \t\n\r\f\v")
    negative = s[:1] == "-"
    if s[:1] in "+-":
        s = s[1:]
    base = 10
    if s[:2].lower() == "0x" and len(s) > 2:
        base, s = 16, s[2:]
    elif s[:1] == "0" and len(s) > 1:
        base, s = 8, s[1:]
    try:
        if not s or not s.isascii() or s.strip() != s or s[:1] in "+-_" or "_" in s:
            return None
        value = int(s, base)
    except ValueError:
        return None
    limit = (1 << 64) - 1
    if value > limit:
        return "range"
    return ((1 << 64) - value) % (1 << 64) if negative else value


def _argument_error(option, text, code):
    """C's error for a number it cannot read: 'Error parsing argument: OPTION TEXT: strerror(CODE)'."""
    return SpipedError("Error parsing argument: %s %s: %s" % (option, text, os.strerror(code)))


def _parse_number(option, text, kind):
    """A numeric option argument, with C's error messages."""
    value = _strtod(text) if kind == "float" else _strtoul(text)
    if value is None:
        raise _argument_error(option, text, errno.EINVAL)
    if value != value and option != "-r":  # "nan": usage, but C takes "-r nan"
        raise UsageError(why="%s: not a number of seconds: %s" % (option, text))
    if value == "range" or value < 0:
        raise _argument_error(option, text, errno.ERANGE)
    return value


def _cli(usage, parse, run):
    """PARSE() the command line, then RUN(options); C's messages and exit codes.

    Only PARSE() raises UsageError and _Exit (a --config line's are SpipedErrors).
    """
    try:
        opts = parse()
        if not load_cipher():
            log.warn("Cryptodome is missing: apt-get install python3-pycryptodome"
                     " (Debian/Ubuntu), or pip install pycryptodomex in a venv")
            return 1
        return run(opts)
    except UsageError as e:
        if e.message:
            log.warn(e.message)
        sys.stderr.write(usage)
        sys.stderr.flush()
        return 1
    except SpipedError as e:
        for line in e.lines:
            log.warn(line)
        return 1
    except _Exit as e:
        return e.status


class TunnelOptions(NamedTuple):
    """One tunnel as its spiped options say: the command line's or a --config line's."""

    decrypt: bool                        # -d; -e otherwise
    source: str                          # -s
    target: str                          # -t
    key: str                             # -k
    accept_keys: tuple = ()              # --accept-key, each time it is given
    bind: Optional[str] = None           # -b
    fast: bool = False                   # -f
    require_pfs: bool = False            # -g
    keepalive: bool = True               # -j turns it off
    max_connections: int = DEFAULT_MAXCONN  # -n; 0: no limit
    timeout: Optional[float] = DEFAULT_TIMEOUT  # -o; None: no limit
    rtime: float = DEFAULT_RTIME         # -r
    re_resolve: bool = True              # -R turns it off
    socket_mode: Optional[int] = None    # --socket-mode
    proxy_protocol: Optional[int] = None  # --proxy-protocol: 1 or 2
    connect_after_auth: bool = False     # --connect-after-auth
    log_connections: bool = False        # --log-connections
    all_addresses: bool = False          # --all-addresses
    keepalive_timers: Optional[tuple] = None  # --keepalive: (idle, interval, count)
    allow: tuple = ()                    # --allow: the networks served; () serves all

    def key_paths(self):
        """-k, then every --accept-key."""
        return (self.key,) + self.accept_keys

    def without_keys(self):
        """These options with the key files left out (what a rekey may change)."""
        return self._replace(key="", accept_keys=())


class ProcessOptions(NamedTuple):
    """spiped's command line: the process's own options, and its tunnel or --config FILE."""

    tunnel: Optional[TunnelOptions]      # None with --config
    config: Optional[str] = None         # --config
    foreground: bool = False             # -F
    wait_dns: bool = False               # -D
    pidfile: Optional[str] = None        # -p
    user: Optional[str] = None           # -u
    syslog: bool = False                 # --syslog
    drain_timeout: Optional[float] = None  # --drain-timeout
    log_label: str = ""                  # --log-label
    check: bool = False                  # --check
    metrics: Optional[str] = None        # --metrics: the endpoint's address
    watch: bool = False                  # --watch (--watch-interval implies it)
    watch_interval: float = WATCH_INTERVAL  # --watch-interval: seconds between looks

    def pidfile_path(self):
        """-p, or the default: the source address (or FILE) with .pid appended."""
        return self.pidfile or (self.config or self.tunnel.source) + ".pid"


class SpipeOptions(NamedTuple):
    """spipe's command line."""

    target: str                          # -t
    key: str                             # -k
    bind: Optional[str] = None           # -b
    fast: bool = False                   # -f
    require_pfs: bool = False            # -g
    keepalive: bool = True               # -j turns it off
    timeout: Optional[float] = DEFAULT_TIMEOUT  # -o; None: no limit


def _text(option, text):
    return text


def _address(option, text):
    try:
        check_address_syntax(text)
    except UsageError as e:
        if _is_extension(option):  # the option, then 1.6.4's words for -s and -t
            raise _misused(option, e.message) from None
        raise
    return text


def _count(option, text):
    return _parse_number(option, text, "int")


def _seconds(option, text):
    return _parse_number(option, text, "float")


def _extension_seconds(option, text):
    """What -o takes (from 0 up, inf for no limit), for a long option: its errors say why."""
    value = _strtod(text)
    if value is None or value != value:
        raise _misused(option, "not a number of seconds: %s" % text)
    if value == "range":
        raise _misused(option, "out of range: %s" % text)
    if value < 0:
        raise _misused(option, "must be 0 or more: %s" % text)
    return value


def _interval(option, text):
    """Seconds above 0 and finite, for a long option: a period between two looks."""
    value = _strtod(text)
    if value is None or value == "range" or not 0 < value < float("inf"):  # nan too
        raise _misused(option, "not a number of seconds above 0: %s" % text)
    return value


def _octal_mode(option, text):
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise _misused(option, "not an octal mode from 0 to 7777: %s" % text)
    return value


def _keepalive_timers(option, text):
    """IDLE[,INTERVAL[,COUNT]] -> (idle, interval, count); INTERVAL defaults to IDLE, COUNT to 3.

    Whole seconds from 1 (Linux's limits: 32767 s, 127 probes).
    """
    fields = text.split(",")
    if len(fields) > 3 or not all(f.isascii() and f.isdigit() for f in fields):
        raise _misused(option, "not IDLE[,INTERVAL[,COUNT]] in whole seconds: %s" % text)
    values = [int(f) for f in fields]
    values += [values[0], KEEPALIVE_COUNT][len(values) - 1:]
    if not (0 < values[0] <= 32767 and 0 < values[1] <= 32767 and 0 < values[2] <= 127):
        raise _misused(option, "IDLE and INTERVAL must be 1 to 32767, COUNT 1 to 127: %s" % text)
    return tuple(values)


def _networks(option, text):
    try:
        return AllowList.parse(text)
    except ValueError as e:
        raise _misused(option, str(e)) from None


def _proxy_version(option, text):
    if text not in ("1", "2"):
        raise _misused(option, "must be 1 or 2: %s" % text)
    return int(text)


# Each option: (the field it sets, how its argument is read; None: a flag).
# The fields "help" and "version" act as they are met; PROCESS_FIELDS
# belong to the process (ProcessOptions), every other field to a tunnel.
SPIPED_OPTIONS = {
    "-e": ("encrypt", None), "-d": ("decrypt", None), "-s": ("source", _address),
    "-t": ("target", _address), "-k": ("key", _text), "-b": ("bind", _address),
    "-f": ("fast", None), "-g": ("require_pfs", None), "-j": ("no_keepalive", None),
    "-n": ("max_connections", _count), "-o": ("timeout", _seconds),
    "-r": ("rtime", _seconds), "-R": ("no_re_resolve", None),
    "-D": ("wait_dns", None), "-F": ("foreground", None), "-p": ("pidfile", _text),
    "-u": ("user", _text), "-v": ("version", None),
    "--syslog": ("syslog", None), "--log-connections": ("log_connections", None),
    "--help": ("help", None), "--connect-after-auth": ("connect_after_auth", None),
    "--drain-timeout": ("drain_timeout", _extension_seconds),
    "--socket-mode": ("socket_mode", _octal_mode),
    "--accept-key": ("accept_keys", _text), "--proxy-protocol": ("proxy_protocol", _proxy_version),
    "--config": ("config", _text), "--log-label": ("log_label", _text),
    "--all-addresses": ("all_addresses", None),
    "--check": ("check", None), "--keepalive": ("keepalive_timers", _keepalive_timers),
    "--metrics": ("metrics", _address), "--allow": ("allow", _networks),
    "--watch": ("watch", None), "--watch-interval": ("watch_interval", _interval),
}
SPIPE_OPTIONS = {
    "-t": ("target", _address), "-k": ("key", _text), "-b": ("bind", _address),
    "-f": ("fast", None), "-g": ("require_pfs", None), "-j": ("no_keepalive", None),
    "-o": ("timeout", _seconds), "-v": ("version", None), "--help": ("help", None),
}
PROCESS_FIELDS = ("foreground", "wait_dns", "pidfile", "user", "version", "syslog",
                  "drain_timeout", "config", "help", "log_label", "check", "metrics",
                  "watch", "watch_interval")
REPEATED_FIELDS = ("accept_keys", "allow")  # may be given more than once, in order


def _read_options(args, table, help_text, tunnel_line=False):
    """{field: value} from ARGS as TABLE reads them, in the order given.

    --help and -v act as they are met, as C's loop does; a repeated option
    or a stray argument is a usage error.  With TUNNEL_LINE (a --config
    line), an option of the process is a UsageError naming it.
    """
    shorts = [o[1] for o in table if len(o) == 2]
    fields = {}
    for option, value in getopt_c(args, [s for s in shorts if table["-" + s][1] is None],
                                  [s for s in shorts if table["-" + s][1] is not None],
                                  [o for o in table if len(o) > 2 and table[o][1] is None],
                                  [o for o in table if len(o) > 2 and table[o][1] is not None]):
        if option is None:
            if value:
                raise UsageError(why="unexpected argument: %s" % value[0])
            break
        field, read = table[option]
        if tunnel_line and field in PROCESS_FIELDS:
            raise UsageError("%s belongs on the command line, not on a tunnel line" % option)
        if field == "help":
            sys.stdout.write(help_text)
            raise _Exit(0)
        if field in REPEATED_FIELDS:
            fields[field] = fields.get(field, ()) + (read(option, value),)
            continue
        if field in fields:
            raise _misused(option, "given more than once")
        if field == "version":
            sys.stderr.write("%s %s\n" % (log.prog, __version__))
            sys.stderr.flush()
            raise _Exit(0)
        fields[field] = True if read is None else read(option, value)
    return fields


def parse_spiped_args(args, tunnel_line=False):
    """ProcessOptions from spiped's command line; TunnelOptions for a --config line.

    Raises UsageError, SpipedError or _Exit.
    """
    fields = _read_options(args, SPIPED_OPTIONS, SPIPED_HELP, tunnel_line)
    process = {f: fields.pop(f) for f in PROCESS_FIELDS if f in fields}
    if "watch_interval" in process:
        process["watch"] = True
    if "config" in process:
        if fields:
            option = next(o for o, (f, _) in SPIPED_OPTIONS.items() if f == next(iter(fields)))
            raise _misused("--config", "tunnel options belong in the file, not on the"
                           " command line: %s" % option)
        return ProcessOptions(None, **process)
    tunnel = _tunnel_options(fields)
    return tunnel if tunnel_line else ProcessOptions(tunnel, **process)


def _tunnel_options(fields):
    """TunnelOptions from a tunnel's FIELDS, with C's checks of how they combine."""
    encrypt, decrypt = fields.pop("encrypt", False), fields.pop("decrypt", False)
    if encrypt == decrypt:
        raise UsageError(why="give -e or -d, not both" if encrypt
                         else "give -e (encrypt) or -d (decrypt)")
    _common_fields(fields, (("-s", "source"), ("-t", "target"), ("-k", "key")))
    if encrypt and "accept_keys" in fields:  # -e always uses -k alone
        raise _misused("--accept-key", "needs -d")
    if fields.get("connect_after_auth") and not decrypt:
        raise _misused("--connect-after-auth", "needs -d")
    if not fields["keepalive"] and "keepalive_timers" in fields:
        raise _misused("--keepalive", "cannot go with -j, which turns keepalive off")
    if "allow" in fields:
        if fields["source"].startswith("/"):
            raise _misused("--allow", "applies to TCP sources, not the unix socket %s"
                           % fields["source"])
        fields["allow"] = sum(fields["allow"], ())  # one tuple of networks per --allow
    rtime = fields.pop("rtime", 0) or DEFAULT_RTIME
    re_resolve = not fields.pop("no_re_resolve", False)
    if not re_resolve and rtime != DEFAULT_RTIME:
        raise UsageError(why="-R (never look the target up again) cannot go with -r %g" % rtime)
    return TunnelOptions(decrypt=decrypt, rtime=rtime, re_resolve=re_resolve, **fields)


def _common_fields(fields, required):
    """C's checks common to both programs (the REQUIRED (option, field)s, -f or -g); then
    -o and -j in FIELDS as both records hold them: timeout (None: no limit), keepalive."""
    missing = [option for option, field in required if field not in fields]
    if missing:
        listed = ", ".join(missing[:-1]) + " and " if len(missing) > 1 else ""
        raise UsageError(why="missing " + listed + missing[-1])
    if fields.get("fast") and fields.get("require_pfs"):
        raise UsageError(why="-f and -g exclude each other")
    timeout = fields.pop("timeout", 0) or DEFAULT_TIMEOUT  # -o 0: the default
    fields["timeout"] = None if timeout == float("inf") else timeout
    fields["keepalive"] = not fields.pop("no_keepalive", False)


def parse_spipe_args(args):
    """SpipeOptions from spipe's command line; raises UsageError/SpipedError/_Exit."""
    fields = _read_options(args, SPIPE_OPTIONS, SPIPE_HELP)
    _common_fields(fields, (("-t", "target"), ("-k", "key")))
    return SpipeOptions(**fields)


def spiped_main(args):
    """spiped: returns the exit status."""
    log.prog = "spiped"
    return _cli(SPIPED_USAGE, lambda: parse_spiped_args(args), _run_spiped)


def _start_process(process):
    """The process options up to binding; returns after_binding(), to call once bound.

    --syslog with -F keeps C's warnings on stderr; -D daemonizes now, before
    any name is resolved, as C does.  after_binding() daemonizes (without
    -D), drops to -u and sizes the threads to come.
    """
    background = not process.foreground
    if process.syslog and not background:
        log.use_syslog(warnings=False)  # C's warnings stay on stderr with -F

    def go_background():
        daemonize(process.pidfile_path())
        if process.syslog:
            log.use_syslog()

    if process.wait_dns and background:
        go_background()

    def after_binding():
        # C checks -u only in the daemon, after its parent has exited 0; an
        # unknown user or group is known now, so report it with exit 1.
        ids = look_up_ids(process.user) if process.user is not None else None
        if background and not process.wait_dns:
            go_background()
        _limit_malloc_arenas()
        if ids is not None:
            warm_up()
            drop_privileges(*ids)
        threading.stack_size(THREAD_STACK)

    return after_binding


def _run_spiped(process):
    """Serve the command line's tunnel, or every tunnel of --config FILE, until SIGTERM."""
    log.set_label(process.log_label)
    if process.check:
        return _check_spiped(process)
    if process.config is not None:
        ConfigFile(process.config).read()  # a broken file fails before -D daemonizes
    after_binding = _start_process(process)
    if process.config is None:
        passed = inherited_listeners(first_only=True)
        plan = CommandLine(process.tunnel, passed[0] if passed else None)
    else:
        plan, passed = ConfigFile(process.config), inherited_listeners()
    watch = FileWatch(process.watch_interval) if process.watch else None
    if watch is not None and process.tunnel is not None and "-" in process.tunnel.key_paths():
        log.warn("--watch: the key read from stdin (-k -) has no file to watch")
    supervisor = Supervisor(plan, process.drain_timeout, passed, process.user, watch)
    specs = plan.load(retry=process.wait_dns)
    supervisor.watch_files(specs)  # as just read: a change while we start is seen
    supervisor.check_passed(specs)
    # Once a socket is bound, a client may see it and a signal may come: hold
    # signals until their handlers are in (SIGHUP would otherwise kill us).
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    servers = supervisor.bind(specs)
    metrics = _bind_metrics(process, supervisor, servers)  # before -u: a port < 1024 works
    after_binding()
    notifier = Notifier()  # now: the daemon's PID is known
    supervisor.tick = min(1.0, notifier.watchdog or 1.0)

    def socket_files():  # what a second SIGTERM removes
        own = [metrics.socket_file] if metrics is not None else []
        return supervisor.socket_files() + [f for f in own if f is not None]
    install_signals(supervisor, socket_files)
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    supervisor.serve(specs, servers)
    if metrics is not None:
        metrics.start()  # after daemonizing: a thread does not survive fork()
    notifier.send("READY=1\nMAINPID=%d" % os.getpid())
    try:
        supervisor.run(notifier)
    finally:
        if metrics is not None:
            metrics.close()
        supervisor.waker.close()
    _exit_now(0)


def _check_spiped(process):
    """--check: what a start does short of binding, daemonizing and serving, in its order.

    Resolves once (-D does not retry); returns 0, or raises SpipedError with a start's messages.
    """
    plan = CommandLine(process.tunnel) if process.config is None else ConfigFile(process.config)
    specs = plan.load()
    for spec in specs.values():
        if spec.family == socket.AF_UNIX:
            try:
                check_socket_path(spec.sockaddr)
            except SpipedError as e:
                raise e.located(spec.where) from None
    if process.user is not None:
        look_up_ids(process.user)
    reason = None if process.foreground else creatable(process.pidfile_path(), replace=True)
    if reason is not None:
        raise pidfile_error(process.pidfile_path(), reason)
    for source, spec in specs.items():
        sys.stdout.write("%s -> %s: ok, %s\n"
                         % (source, spec.options.target, _count_keys(len(spec.keyring))))
    sys.stdout.flush()
    return 0


def _bind_metrics(process, supervisor, servers):
    """--metrics' MetricsServer for SUPERVISOR, bound, or None; on failure SERVERS are closed."""
    if process.metrics is None:
        return None
    try:
        family, sockaddr = resolve(process.metrics)[0]
        try:
            return MetricsServer(family, sockaddr, supervisor.metrics)
        except OSError as e:
            raise SpipedError("Error binding --metrics socket %s: %s"
                              % (process.metrics, e.strerror)) from None
    except SpipedError:
        for server in servers.values():
            server.server_close()
        raise


def _exit_now(status):
    """End a daemon that has served: flush, then exit without finalizing.

    Connection threads are daemon threads; one still inside a write to
    stderr while the interpreter finalizes makes it abort (SIGABRT) on
    the stream's lock.  Nothing is left to finalize: sockets are closed
    and every line is written before a drain ends.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


# -- spipe -------------------------------------------------------------------


def spipe_main(args):
    """spipe: one encrypted connection with stdin/stdout as the plaintext end."""
    log.prog = "spipe"
    return _cli(SPIPE_USAGE, lambda: parse_spipe_args(args), _run_spipe)


def _run_spipe(options):
    global _POWER
    _POWER = _monty_power() or _builtin_power  # two exponentiations: loading GMP costs more
    targets = resolve(options.target)
    bind = bind_address(options.bind)[0][1] if options.bind is not None else None
    key = read_key(options.key)
    set_signals({signal.SIGTERM: lambda signum, frame: os._exit(0),
                 signal.SIGINT: signal.SIG_DFL})
    try:
        sock = Dialer(targets, bind).take(deadline_in(options.timeout))
    except ConnectError:
        log.warn("Could not connect")
        return 1
    try:
        sealer, opener = handshake(sock, key, client=True, fast=options.fast,
                                   require_pfs=options.require_pfs,
                                   deadline=deadline_in(options.timeout))
    except HandshakeError:
        log.warn("Handshake failed")
        return 1
    tune_socket(sock, options.keepalive)
    # No finalizing: the stdin reader may still block, and tearing down every
    # module takes longer than the request did (7 ms of about 90).
    _exit_now(_spipe_relay(sock, sealer, opener))


def _spipe_relay(sock, sealer, opener):
    """Copy stdin -> SOCK and SOCK -> stdout; exit when the server side ends."""
    outcome = []
    done = threading.Event()

    def upload():
        # A failed upload ends nothing by itself: the peer went away, and
        # the download then sees EOF or a reset and decides the outcome.
        try:
            relay(lambda n: os.read(0, n), sealer, sock.sendall)
            _shutdown(sock, socket.SHUT_WR)
        except OSError:
            _shutdown_quietly(sock, socket.SHUT_WR)

    def write_stdout(data):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    def download():
        try:
            relay(sock.recv, opener, write_stdout, _peeker(sock))
        except BadPacket:
            outcome.append("Connection error")
        except OSError as e:
            outcome.append("Error reading: %s" % (e.strerror or e))
        done.set()

    threading.Thread(target=upload, daemon=True).start()
    threading.Thread(target=download, daemon=True).start()
    done.wait()
    if outcome:
        log.warn(outcome[0])
        return 1
    return 0


def main(argv=None):
    """Entry point: spiped, or spipe when invoked as 'spipe' or 'spiped.py spipe'."""
    argv = list(sys.argv if argv is None else argv)
    name = os.path.basename(argv[0]) if argv else "spiped"
    if name in ("spipe", "spipe.py"):
        return spipe_main(argv[1:])
    if len(argv) > 1 and argv[1] == "spipe":
        return spipe_main(argv[2:])
    return spiped_main(argv[1:])


def spipe_entry():
    """Console script 'spipe'."""
    return spipe_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())


