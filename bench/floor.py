#!/usr/bin/env python3
"""The bench's floor: a plain TCP relay shaped like spiped's server.

No crypto, no handshake: accept, dial the target, relay one direction in a
new thread and the other in the handler's own thread (recv(65536) /
sendall), half-close at EOF, close both sockets at the end.  bench.py runs a
pair of these where it runs the -e and -d daemons; it is never part of
spiped.py.  Usage: floor.py -s HOST:PORT -t HOST:PORT
"""

import argparse
import socket
import socketserver
import threading


def pipe(src, dst):
    """Copy SRC to DST until EOF, then half-close DST."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
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
            back = threading.Thread(target=pipe, args=(up, self.request), daemon=True)
            back.start()
            pipe(self.request, up)
            back.join()


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 10          # spiped's listen backlog


def addr(text):
    host, _, port = text.strip("[").rpartition(":")
    return host.rstrip("]"), int(port)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-s", type=addr, required=True, metavar="HOST:PORT")
    ap.add_argument("-t", type=addr, required=True, metavar="HOST:PORT")
    a = ap.parse_args()
    with Server(a.s, Relay) as srv:
        srv.target = a.t
        srv.serve_forever()
