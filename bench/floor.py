#!/usr/bin/env python3
"""The bench's floor: a plain TCP relay shaped like spiped's server.

No crypto, no handshake: accept, dial the target, relay one direction in a
new thread and the other in the handler's own thread (recv(65536) /
sendall), half-close at EOF, close both sockets at the end.  bench.py runs a
pair of these where it runs the -e and -d daemons; it is never part of
spiped.py.  Usage: floor.py -s HOST:PORT -t HOST:PORT

With --codec PATH/spiped.py -e|-d it also seals and opens every byte with
that file's PacketSealer and PacketOpener (fixed keys, no handshake): the
floor plus exactly our per-packet work, to tell the two costs apart.
"""

import argparse
import importlib.util
import socket
import socketserver
import threading


class Plain:
    """No codec: bytes pass as they are."""
    read_sizes = (65536, 65536)

    @staticmethod
    def transform(data):
        return data


def pipe(src, dst, codec=Plain):
    """Copy SRC to DST through CODEC until EOF, then half-close DST.

    A codec reads what ours reads while traffic is light (small messages).
    """
    size = codec.read_sizes[0]
    transform = codec.transform
    try:
        while True:
            data = src.recv(size)
            if not data:
                break
            out = transform(data)
            if out:
                dst.sendall(out)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class Relay(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            up = socket.create_connection(self.server.target)
        except OSError:
            return
        with up:
            for s in (self.request, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            forth, back_codec = self.server.codecs()
            back = threading.Thread(target=pipe, args=(up, self.request, back_codec),
                                    daemon=True)
            back.start()
            pipe(self.request, up, forth)
            back.join()


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 10          # C's listen backlog (ours behind a -n limit)


def addr(text):
    host, _, port = text.strip("[").rpartition(":")
    return host.rstrip("]"), int(port)


def codec_maker(path, mode):
    """A function giving (outward codec, inward codec) for one connection."""
    if path is None:
        return lambda: (Plain, Plain)
    spec = importlib.util.spec_from_file_location("spiped_codec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out_keys, in_keys = (bytes(32), bytes([1]) * 32), (bytes([2]) * 32, bytes([3]) * 32)
    if mode == "d":
        return lambda: (mod.PacketOpener(*out_keys), mod.PacketSealer(*in_keys))
    return lambda: (mod.PacketSealer(*out_keys), mod.PacketOpener(*in_keys))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-s", type=addr, required=True, metavar="HOST:PORT")
    ap.add_argument("-t", type=addr, required=True, metavar="HOST:PORT")
    ap.add_argument("--codec", metavar="SPIPED_PY", help="seal and open with this file's codecs")
    ap.add_argument("-e", dest="mode", action="store_const", const="e", default="e")
    ap.add_argument("-d", dest="mode", action="store_const", const="d")
    a = ap.parse_args()
    with Server(a.s, Relay) as srv:
        srv.target = a.t
        srv.codecs = codec_maker(a.codec, a.mode)
        srv.serve_forever()
