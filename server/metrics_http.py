"""The /metrics endpoint, with bounds a stranger on the network cannot push past.

prometheus_client's own server starts a thread per connection and waits on each forever:
300 half-open requests made 300 threads.  Here a connection that sends nothing for
``READ_TIMEOUT_S`` is dropped, and past ``MAX_CONNECTIONS`` at once a new one is closed at
once (Prometheus retries at its next scrape), so the endpoint holds a few threads at most.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

READ_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 8


class _QuietHandler(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S  # socketserver sets it on the connection: reads give up after it

    def log_message(self, format, *args):  # noqa: A002  (the signature is the standard library's)
        pass


class _BoundedServer(ThreadingWSGIServer):
    def __init__(self, *args, **kwargs) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class MetricsHTTPServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server = make_server(host, port, make_wsgi_app(registry), _BoundedServer, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
