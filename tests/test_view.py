"""`geoseg view`: a real server on a free port, real HTTP requests, and a real headless browser."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config
from PIL import Image

from geoseg.jobs import run
from geoseg.maptiles import WEB_MERCATOR
from geoseg.synth import SceneSpec, write_scene
from geoseg.view import ViewServer


def hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, client2):
    d = tmp_path_factory.mktemp("view")
    scene = write_scene(SceneSpec(900, 700, seed=21), d / "scene.tif")[0]
    out = d / "run"
    cfg = run_config("builtin:demo", [scene], out, "tiling.tile_size=256", "tiling.overlap=32", "output.block_size=256")
    assert run(cfg, client2).ok
    return out


def serve(out: Path):
    server = ViewServer(str(out), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def server(finished_run):
    server = serve(finished_run)
    yield server
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


def tile_at(server, layer: str, lon: float, lat: float, zoom: int) -> np.ndarray:
    t = WEB_MERCATOR.tile(lon, lat, zoom)
    status, body, kind = get(f"{server.url}/{layer}/tiles/{t.z}/{t.x}/{t.y}.png")
    assert status == 200 and kind == "image/png"
    image = Image.open(io.BytesIO(body))
    assert image.size == (256, 256) and image.mode == "RGBA"
    return np.asarray(image)


def test_the_page_loads_nothing_from_outside(server):
    status, body, kind = get(f"{server.url}/")
    assert status == 200 and kind.startswith("text/html")
    page = body.decode()
    assert "/static/maplibre/maplibre-gl.js" in page
    for asset in ("/static/view.js", "/static/maplibre/maplibre-gl.js", "/static/maplibre/maplibre-gl.css"):
        status, text, _ = get(server.url + asset)
        assert status == 200 and len(text) > 100
    script = get(f"{server.url}/static/view.js")[1].decode()
    for text in (page, script):
        assert "https://" not in text and "http://" not in text  # no CDN, no tile service
    assert b"MapLibre" in get(f"{server.url}/static/maplibre/LICENSE.txt")[1]


def test_tilejson_and_a_tile_at_the_centre_in_class_colours(server, finished_run):
    status, body, _ = get(f"{server.url}/classes/tilejson.json")
    tilejson = json.loads(body)
    assert status == 200 and tilejson["tilejson"] == "3.0.0"
    assert tilejson["tiles"] == [f"{server.url}/classes/tiles/{{z}}/{{x}}/{{y}}.png"]
    west, south, east, north = tilejson["bounds"]
    legend = json.loads(get(f"{server.url}/legend.json")[1])
    colors = {hex_rgb(row["color"]) for row in legend}
    assert [row["name"] for row in legend][:2] == ["water", "forest"] and legend[1]["km2"] > 0
    for zoom in (tilejson["maxzoom"], tilejson["maxzoom"] - 3):  # full resolution, and an overview level
        rgba = tile_at(server, "classes", (west + east) / 2, (south + north) / 2, zoom)
        opaque = rgba[rgba[..., 3] == 255][:, :3]
        assert len(opaque) > 0.5 * 256 * 256
        assert set(map(tuple, opaque.tolist())) <= colors  # nearest neighbour: no blended colour
        assert len(set(map(tuple, opaque.tolist()))) >= 3
        assert set(np.unique(rgba[..., 3])) <= {0, 255}
    confidence = tile_at(server, "confidence", (west + east) / 2, (south + north) / 2, tilejson["maxzoom"])
    assert (confidence[..., 3] == 255).mean() > 0.5 and len(np.unique(confidence[..., 0])) > 3  # a ramp
    outside = tile_at(server, "classes", east + 1.0, north + 1.0, tilejson["maxzoom"])
    assert (outside[..., 3] == 0).all()


def test_polygons_by_bbox_carry_their_attributes(server):
    west, south, east, north = json.loads(get(f"{server.url}/run.json")[1])["bounds"]
    cx, cy = (west + east) / 2, (south + north) / 2
    bbox = f"{cx - 0.005},{cy - 0.005},{cx + 0.005},{cy + 0.005}"
    status, body, _ = get(f"{server.url}/polygons.geojson?bbox={bbox}")
    features = json.loads(body)["features"]
    assert status == 200 and 0 < len(features) < 5000
    assert {"class_id", "class_name", "area_m2"} <= set(features[0]["properties"])
    lon, lat = features[0]["geometry"]["coordinates"][0][0]
    assert abs(lon - cx) < 0.1 and abs(lat - cy) < 0.1  # lon/lat, not metres


@pytest.mark.parametrize(
    "path",
    [
        "/..%2f..%2fetc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/maplibre/..%2f..%2fview.py",
        "/classes/tiles/1/5/0.png",
        "/nosuchlayer/tilejson.json",
        "/mosaic.zarr/zarr.json",
    ],
)
def test_paths_outside_the_routes_are_404(server, path):
    request = urllib.request.Request(server.url + path)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    assert status == 404


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium not installed")
def test_a_headless_browser_draws_the_map_in_class_colours(server, tmp_path):
    legend = json.loads(get(f"{server.url}/legend.json")[1])
    for attempt in range(3):  # headless chromium's virtual time can end before the tiles arrive on busy cores
        shot = tmp_path / f"map{attempt}.png"
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / f'profile{attempt}'}",
                "--window-size=900,700",
                "--virtual-time-budget=15000",
                f"--screenshot={shot}",
                f"{server.url}/",
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
        pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
        shares = {row["name"]: (pixels == hex_rgb(row["color"])).all(axis=1).mean() for row in legend}
        if sum(shares.values()) > 0.2:
            break
    drawn = [name for name, share in shares.items() if share > 0.005]
    assert len(drawn) >= 3, shares  # the map, in the classes' own colours
    assert sum(shares.values()) > 0.2, shares


def test_a_foreign_host_bad_boxes_and_a_removed_run_get_clear_answers(tmp_path, finished_run):
    # a copy of the run, so that it can be removed while served
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    server = serve(copy)
    try:
        rebinding = urllib.request.Request(f"{server.url}/run.json", headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebinding, timeout=10)
        assert refused.value.code == 403  # a page that points its domain at 127.0.0.1 reads nothing
        assert get(f"{server.url.replace('127.0.0.1', 'localhost')}/run.json")[0] == 200  # an SSH tunnel's name
        for bbox in ("", "abc", "1,2,3", "nan,0,1,1", "15.04,46.92,15.03,46.93", "15,47,16,46"):
            status, body, _ = get(f"{server.url}/polygons.geojson?bbox={bbox}")
            assert status == 400 and body.startswith(b"bbox=W,S,E,N expected"), (bbox, body)
        shutil.rmtree(copy / "mosaic.zarr")
        status, body, _ = get(f"{server.url}/classes/tiles/0/0/0.png")
        assert status == 404 and b"no longer there" in body
    finally:
        server.shutdown()
        server.server_close()


def raw_request(server, request: bytes) -> bytes:
    """What the server sends back for ``request``, until it closes the connection."""
    with socket.create_connection(server.server_address[:2], timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_head_answers_as_get_without_a_body_and_requests_beyond_the_cap_get_503(finished_run):
    server = ViewServer(str(finished_run), "127.0.0.1", 0, max_connections=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    idle: list[socket.socket] = []
    try:
        answer = raw_request(server, b"HEAD /legend.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"Content-Type: application/json" in head
        assert f"Content-Length: {len(get(f'{server.url}/legend.json')[1])}".encode() in head and body == b""
        deadline = time.time() + 10
        while server.serving and time.time() < deadline:  # the requests' threads are still ending
            time.sleep(0.01)
        idle = [socket.create_connection(server.server_address[:2]) for _ in range(2)]  # both slots held
        status, body, _ = get(f"{server.url}/legend.json")  # accepted after them, in order
        assert status == 503 and body == b"busy"
        idle.pop().close()  # a slot frees: the next request is served
        deadline = time.time() + 10
        while (status := get(f"{server.url}/legend.json")[0]) == 503 and time.time() < deadline:
            time.sleep(0.05)  # the freed slot's thread is still ending
        assert status == 200
    finally:
        for conn in idle:
            conn.close()
        server.shutdown()
        server.server_close()


def test_geoseg_view_stops_quietly_on_sigterm_as_on_ctrl_c(finished_run):
    """SIGTERM is how a server is stopped (docker stop, systemd): exit 0, no error line."""
    import signal
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "geoseg", "view", str(finished_run), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    assert first.startswith("geoseg view: http://127.0.0.1:"), first
    assert get(first.split()[2])[0] == 200  # it serves
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "error" not in stderr, stderr
