"""A header-translating HTTP proxy: the official Elasticsearch client in front of osmem-server.

The `elasticsearch` 9 client sends vendor media types (``application/vnd.elasticsearch+json;
compatible-with=9``) and refuses a server whose responses lack ``X-Elastic-Product:
Elasticsearch``; osmem-server speaks the OpenSearch REST API, which is the same for every call
our Elasticsearch flavour makes (bulk, search with search_after, index templates, cat, delete,
refresh), and rejects those media types. This proxy rewrites the two headers and nothing else, so
the Elasticsearch flavour's own client code runs over real HTTP against a real server in tests.
What it does not prove (Elasticsearch's own behaviour, ILM) is said in the README.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_MEDIA = {
    "application/vnd.elasticsearch+json": "application/json",
    "application/vnd.elasticsearch+x-ndjson": "application/x-ndjson",
}


def _plain(value: str) -> str:
    for vendor, plain in _MEDIA.items():
        if value.startswith(vendor):
            return plain
    return value


# Set by this proxy (or by BaseHTTPRequestHandler itself), not copied from upstream.
_HOP_BY_HOP = ("content-length", "transfer-encoding", "connection", "date", "server", "x-elastic-product")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: object) -> None:
        self.connections: set[socket.socket] = set()
        super().__init__(*args)

    def get_request(self) -> tuple[socket.socket, object]:
        connection, address = super().get_request()
        self.connections.add(connection)
        return connection, address

    def cut_connections(self) -> None:
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
                connection.close()
        self.connections.clear()


class ElasticsearchProxy:
    def __init__(self, upstream: str, port: int = 0) -> None:
        target = urlparse(upstream)
        upstream_host, upstream_port = target.hostname, target.port

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: _plain(v) if k.lower() in ("content-type", "accept") else v
                    for k, v in self.headers.items()
                }
                headers.pop("Host", None)
                connection = http.client.HTTPConnection(upstream_host, upstream_port, timeout=30)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    upstream_response = connection.getresponse()
                    payload = upstream_response.read()
                except OSError:
                    self.send_error(502)
                    return
                finally:
                    connection.close()
                self.send_response(upstream_response.status)
                for key, value in upstream_response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: object) -> None:
                pass

        self._server = _Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ElasticsearchProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop, and cut open connections too: a stopped proxy is a store that went away."""
        self._server.shutdown()
        self._server.server_close()
        self._server.cut_connections()
