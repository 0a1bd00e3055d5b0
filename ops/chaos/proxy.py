"""A loopback TCP proxy that can make a service unreachable without stopping it.

The chaos run puts it in front of the S3 server (moto keeps its objects in memory: restarting it would
lose them). ``pause()`` closes the listening socket (new connections are refused: ECONNREFUSED) and
drops every open connection; ``resume()`` listens again on the same port. Threads, not asyncio: one
accept thread, and two pump threads per connection, which is plenty for a handful of S3 clients.

    proxy = TcpProxy(("127.0.0.1", 9000)).start()   # proxy.port: point clients here
    proxy.pause(); ...; proxy.resume(); proxy.close()
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

CHUNK_BYTES = 64 * 1024


@dataclass
class ProxyStats:
    accepted: int = 0  # connections accepted while up
    dropped: int = 0  # open connections cut by pause()
    pauses: int = 0
    bytes_up: int = 0  # client → target
    bytes_down: int = 0  # target → client


@dataclass
class TcpProxy:
    """Forward 127.0.0.1:`port` to `target`; `pause()` refuses and drops, `resume()` restores."""

    target: tuple[str, int]
    port: int = 0  # 0: pick a free port at start; kept across pause/resume
    host: str = "127.0.0.1"
    stats: ProxyStats = field(default_factory=ProxyStats)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._paused = True

    # ------------------------------------------------------------ control

    def start(self) -> TcpProxy:
        self.resume()
        return self

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def paused(self) -> bool:
        return self._paused

    def resume(self) -> None:
        """Listen again on the same port (a no-op when already up)."""
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, self.port))
            s.listen(128)
            self.port = s.getsockname()[1]
            self._listener = s
            self._paused = False
        threading.Thread(target=self._accept_loop, args=(s,), name=f"proxy-accept-{self.port}", daemon=True).start()

    def pause(self) -> None:
        """Refuse new connections and cut the open ones: the target is unreachable until resume()."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self._paused = True
            if listener is not None:
                self.stats.pauses += 1
            self.stats.dropped += len(conns) // 2
        if listener is not None:
            _close(listener)
        for c in conns:
            _close(c)

    def close(self) -> None:
        self.pause()

    # ------------------------------------------------------------ forwarding

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed by pause()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # paused meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._conns.update((client, upstream))
                self.stats.accepted += 1
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(CHUNK_BYTES)
                if not data:
                    break
                dst.sendall(data)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        except OSError:
            pass
        finally:
            # One side ended: end both, so neither end waits on a half-open connection.
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
