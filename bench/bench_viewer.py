"""How fast `em-platform viewer` hands a browser an image's chunks, against Python's own static file server.

A fused montage (default 8192² uint8, 1024² chunks: 64 chunks at level 0, the pyramid above) is written
once; then every chunk of every level is fetched the way Neuroglancer fetches them (HTTP/1.1, 6 connections
at a time, as a browser per host), through the viewer (``/data/<key>``: the key checked segment by segment,
the path resolved inside the root, images only) and through ``http.server.SimpleHTTPRequestHandler`` on the
same folder (no checks): the ratio is what the viewer's checks cost. Each is fetched ``--rounds`` times,
alternating, and the median round counts.

    python -m bench.bench_viewer              # writes bench/results/viewer.json
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dask.array as da
import numpy as np

from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.viewer.server import ViewerServer

OUT = Path(__file__).resolve().parent / "results" / "viewer.json"
CONNECTIONS = 6  # a browser's connections per host over HTTP/1.1


class _Quiet(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass


def _fetch_all(host: str, port: int, paths: list[str]) -> tuple[float, int]:
    """Seconds to GET every path over CONNECTIONS keep-alive connections; bytes received."""
    shares = [paths[i::CONNECTIONS] for i in range(CONNECTIONS)]

    def one(share: list[str]) -> int:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        got = 0
        for path in share:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}")
            got += len(body)
        conn.close()
        return got

    started = time.perf_counter()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        total = sum(pool.map(one, shares))
    return time.perf_counter() - started, total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_viewer_") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, (args.side, args.side), dtype=np.uint8)
        url = root / "acquisition" / "m" / "montage.ome.zarr"
        write_ome_zarr(
            da.from_array(image, chunks=2048),
            str(url),
            axes=("y", "x"),
            scale=(4.0, 4.0),
            units=("nanometer",) * 2,
        )
        chunks = sorted(p.relative_to(root).as_posix() for p in url.rglob("c/*/*") if p.is_file())
        viewer = ViewerServer(str(root)).start()
        static = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
        static.daemon_threads = True
        threading.Thread(target=static.serve_forever, daemon=True).start()
        try:
            rounds: dict[str, list[float]] = {"viewer": [], "static": []}
            size = 0
            for _ in range(args.rounds):
                for name, port, prefix in (
                    ("viewer", viewer.server_address[1], "/data/"),
                    ("static", static.server_address[1], "/"),
                ):
                    seconds, size = _fetch_all("127.0.0.1", port, [prefix + c for c in chunks])
                    rounds[name].append(seconds)
        finally:
            viewer.stop()
            static.shutdown()
            static.server_close()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    result = {
        "image": f"{args.side}x{args.side} uint8, 1024² chunks, every level",
        "chunks": len(chunks),
        "bytes": size,
        "connections": CONNECTIONS,
        "rounds": args.rounds,
        "viewer_s": rounds["viewer"],
        "static_s": rounds["static"],
        "viewer_chunks_per_s": round(len(chunks) / med["viewer"], 1),
        "viewer_mib_per_s": round(size / 2**20 / med["viewer"], 1),
        "viewer_time_over_static": round(med["viewer"] / med["static"], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))
    return result


if __name__ == "__main__":
    main()
