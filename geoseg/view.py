"""``geoseg view``: a small web server that shows a finished run on a map.

Routes (nothing else is served; every other path, ``..`` included, is a 404):

    /                                   the map page (MapLibre GL JS, vendored: nothing from outside)
    /static/<file>                      the page's script, style and the vendored library
    /run.json                           name, kind, extent and layers of the run
    /legend.json                        names, colours and area per class
    /<layer>/tilejson.json              TileJSON 3.0 of a raster layer
    /<layer>/tiles/<z>/<x>/<y>.png      a 256 px tile, Web Mercator (XYZ)
    /polygons.geojson?bbox=W,S,E,N      the polygons that meet a lon/lat box

Static files are served from a table built at start-up from the package's ``web`` folder,
so a request's path never reaches the file system.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from geoseg import storage
from geoseg.maptiles import RunTiles

log = logging.getLogger(__name__)

TILE_ROUTE = re.compile(r"^/(?P<layer>[a-z_]+)/tiles/(?P<z>\d{1,2})/(?P<x>\d{1,9})/(?P<y>\d{1,9})\.png$")
TILEJSON_ROUTE = re.compile(r"^/(?P<layer>[a-z_]+)/tilejson\.json$")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".css": "text/css",
    ".txt": "text/plain",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the package's ``web`` folder by its URL path, with its content type."""
    files: dict[str, tuple[bytes, str]] = {}

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif "." in entry.name:
                suffix = entry.name[entry.name.rindex(".") :]
                files[f"/static/{prefix}{entry.name}"] = (entry.read_bytes(), CONTENT_TYPES.get(suffix, "text/plain"))

    walk(resources.files("geoseg") / "web", "")
    return files


class BadRequestError(ValueError):
    """A request this server answers with 400 and the message."""


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``W,S,E,N`` in lon/lat, west of east and south of north."""
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError:
        raise BadRequestError("bbox=W,S,E,N expected: four numbers, lon/lat") from None
    if not all(math.isfinite(v) for v in (west, south, east, north)) or west >= east or south >= north:
        raise BadRequestError("bbox=W,S,E,N expected: finite, west < east, south < north")
    return max(west, -180.0), max(south, -90.0), min(east, 180.0), min(north, 90.0)


class ViewServer(ThreadingHTTPServer):
    """An HTTP server bound to one run's tiles. It serves at most ``max_connections`` requests
    at once, a thread each; a request beyond that is answered 503 at once (the browser asks
    again), rather than each taking a thread and the tiles' memory."""

    daemon_threads = True
    request_queue_size = 64  # connections the kernel holds until they are accepted

    def __init__(self, out: str, host: str = "127.0.0.1", port: int = 8000, max_connections: int = 64) -> None:
        self.tiles = RunTiles(out)
        self.files = static_files()
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), ViewHandler)

    @property
    def serving(self) -> int:
        """Connections being served now (a finished one counts until its thread ends)."""
        return self.max_connections - self._slots._value

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # no waiting in the accepting thread
            with contextlib.suppress(OSError):
                request.sendall(BUSY)
                request.shutdown(socket.SHUT_WR)
                request.settimeout(0.1)
                request.recv(65536)  # the request, read: closing on unread bytes resets the answer away
            self.close_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nbusy"
)
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}


class ViewHandler(BaseHTTPRequestHandler):
    server: ViewServer
    timeout = 60  # seconds a connection may sit idle: a stalled client does not hold a thread forever

    head_only = False

    def do_HEAD(self) -> None:  # noqa: N802 (the http.server API)
        """As GET, without the body (what link checkers and ``curl -I`` ask)."""
        self.head_only = True  # this connection's next request may be a GET
        try:
            self.do_GET()
        finally:
            self.head_only = False

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        try:
            if not self.host_allowed():
                return self.send(HTTPStatus.FORBIDDEN, b"unknown Host", "text/plain")
            if not self.server.tiles.present():
                return self.send(HTTPStatus.NOT_FOUND, b"the run is no longer there", "text/plain")
            self.route(path, query)
        except (BrokenPipeError, ConnectionError):  # the browser went on to other tiles
            pass
        except BadRequestError as exc:
            self.send(HTTPStatus.BAD_REQUEST, str(exc).encode(), "text/plain")
        except Exception as exc:  # the details go to the log, not to the browser
            log.warning("%s: %s: %s", path, type(exc).__name__, storage.redact(str(exc)))
            self.send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error (see the server's log)", "text/plain")

    def host_allowed(self) -> bool:
        """A server on the loopback answers only requests addressed to the loopback: a web page
        that points its own domain at 127.0.0.1 (DNS rebinding) gets nothing."""
        bound = self.server.server_address[0]
        if bound not in LOOPBACK_NAMES:
            return True  # served to a network on purpose (--host)
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        return name in LOOPBACK_NAMES

    def route(self, path: str, query: dict[str, list[str]]) -> None:
        tiles = self.server.tiles
        if path == "/":
            body, kind = self.server.files["/static/index.html"]
            return self.send(HTTPStatus.OK, body, kind)
        if path in self.server.files:
            body, kind = self.server.files[path]
            return self.send(HTTPStatus.OK, body, kind, cache="max-age=3600")
        if path == "/run.json":
            return self.send_json(
                {
                    "name": storage.name(tiles.out),
                    "kind": tiles.kind,
                    "bounds": list(tiles.bounds_lonlat),
                    "layers": [{"name": layer.name, "title": layer.title} for layer in tiles.layers.values()],
                    "polygons": tiles.polygons_location() is not None,
                }
            )
        if path == "/legend.json":
            return self.send_json(tiles.legend_rows())
        if path == "/polygons.geojson":
            return self.send_json(tiles.polygons_geojson(parse_bbox(query.get("bbox", [""])[0])))
        if (match := TILEJSON_ROUTE.match(path)) and match["layer"] in tiles.layers:
            return self.send_json(tiles.tilejson(match["layer"], self.base_url()))
        if (match := TILE_ROUTE.match(path)) and match["layer"] in tiles.layers:
            z, x, y = int(match["z"]), int(match["x"]), int(match["y"])
            if z > 30 or not (0 <= x < 2**z and 0 <= y < 2**z):
                return self.send(HTTPStatus.NOT_FOUND, b"no such tile", "text/plain")
            return self.send(HTTPStatus.OK, tiles.tile_png(match["layer"], z, x, y), "image/png", cache="max-age=60")
        self.send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{self.headers.get('Host') or f'{host}:{port}'}"

    def send_json(self, document: Any) -> None:
        self.send(HTTPStatus.OK, json.dumps(document).encode(), "application/json")

    def send(self, status: HTTPStatus, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        if not self.head_only:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server API)
        log.debug("%s " + format, self.address_string(), *args)
