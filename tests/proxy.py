"""A TCP proxy on 127.0.0.1 that tests can break, for failures a server kill cannot show.

    proxy = Proxy(target_port)          # forwards 127.0.0.1:proxy.port -> 127.0.0.1:target_port
    proxy.blackhole()                   # new connections are accepted and never answered
    proxy.refuse()                      # new connections are refused (nothing listens)
    proxy.cut()                         # live connections are dropped (the client sees EOF)
    proxy.freeze()                      # a host that vanished: a black hole for new connections,
                                        # and live ones stay open but carry nothing any more
    proxy.lose_flows()                  # a firewall or NAT that forgot its state: live connections
                                        # stay open but carry nothing any more; new ones work
    proxy.forward()                     # back to normal
    proxy.delay = 0.01                  # every chunk waits this long each way (a far server:
                                        # slow logins, a round trip of at least 2 * delay)
    proxy.close()

A black hole is the nasty case for a pool: connect() succeeds and then nothing comes back, so
only a timeout tells the client, and every caller who tries pays that timeout.
"""

from __future__ import annotations

import select
import socket
import threading
import time


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"
        self.delay = 0.0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._lost: set[socket.socket] = set()  # client sides whose flows carry nothing
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self.accepted = 0  # connections accepted so far, whatever the mode (probes included)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="test-proxy")
        self._thread.start()

    # -- controls ------------------------------------------------------------------------------

    def forward(self) -> None:
        with self._lock:
            self.mode = "forward"
            if self._listener is None:
                self._listener = self._listen(self.port)

    def blackhole(self) -> None:
        with self._lock:
            self.mode = "blackhole"
            if self._listener is None:
                self._listener = self._listen(self.port)

    def freeze(self) -> None:
        with self._lock:
            self.mode = "frozen"
            if self._listener is None:
                self._listener = self._listen(self.port)

    def lose_flows(self) -> None:
        with self._lock:
            self._lost.update(client for client, _ in self._pairs)

    def refuse(self) -> None:
        with self._lock:
            self.mode = "refuse"
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def cut(self) -> None:
        """Drop every live connection, both sides, as a dying host or a reset link would."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

    def close(self) -> None:
        self._closed = True
        self.refuse()
        self.cut()

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- machinery -----------------------------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        return s

    def _accept_loop(self) -> None:
        while not self._closed:
            with self._lock:
                listener = self._listener
            if listener is None:
                threading.Event().wait(0.01)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], 0.05)
                if not ready:
                    continue
                client, _ = listener.accept()
            except OSError:  # the listener was closed under us by refuse()
                continue
            self.accepted += 1
            if self.mode in ("blackhole", "frozen"):
                with self._lock:
                    self._pairs.append((client, None))
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while True:
                ready, _, _ = select.select(socks, [], [], 0.5)
                if self.mode == "frozen" or a in self._lost:  # read nothing, answer nothing
                    ready = []
                    threading.Event().wait(0.01)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("closed")
                    if self.delay:
                        time.sleep(self.delay)
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass
