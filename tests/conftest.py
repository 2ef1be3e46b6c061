"""Shared fixtures: an S3 API server on 127.0.0.1 (moto), and small generated ImageFolders.

`odd_image_folder` holds every odd input the shard stage must survive, with the verdict expected for
each file; `fmnist_folder` is a little of the real Fashion-MNIST.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

FMNIST_SOURCE = "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------------------------ S3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1; yields its endpoint URL.

    Credentials and endpoint go in the environment only, as in production: subprocesses pick the endpoint
    up from FSSPEC_S3_ENDPOINT_URL when they import fsspec; this process imported fsspec already, so its
    config gets the same value.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {**(saved_conf or {}), "endpoint_url": endpoint}
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf


# What the fault proxy answers a failed request with: S3's error code for the status.
_S3_ERROR_CODES = {500: "InternalError", 503: "SlowDown"}
PROXY_DELAY_S = 2.0  # how long a "delay" fault holds a request before forwarding it


class S3RequestCounter:
    """A reverse proxy in front of moto's server that counts the requests passing through it, by method."""

    def __init__(self, upstream: str, fault=None):
        """`fault(method, path, n)` -> what becomes of the n-th request: an HTTP status to answer instead of
        forwarding it, "drop" (the connection closed without an answer), "lose" (forwarded, then the connection
        closed: it took effect, its answer is lost), "delay" (forwarded PROXY_DELAY_S later), a float (forwarded that
        many seconds later) or None (forwarded). `peak` holds the most requests of each method in flight at once."""
        import http.client
        import threading
        import time
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        counts, lock = Counter(), threading.Lock()
        in_flight, peak = Counter(), Counter()

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with lock:
                    counts["all"] += 1
                    status = fault(self.command, self.path, counts["all"]) if fault else None
                    in_flight[self.command] += 1
                    peak[self.command] = max(peak[self.command], in_flight[self.command])
                try:
                    self._answer(body, status)
                finally:
                    with lock:
                        in_flight[self.command] -= 1

            def _answer(self, body, status):
                if status == "drop":
                    self.close_connection = True  # the request was read: the client sees the socket close
                    return
                if status == "delay" or isinstance(status, float):
                    time.sleep(PROXY_DELAY_S if status == "delay" else status)
                elif isinstance(status, int):
                    self.send_response(status)
                    code = _S3_ERROR_CODES.get(status, "InternalError")
                    message = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD reply has no body: the connection stays usable
                        self.wfile.write(message)
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                upstream_conn.request(self.command, self.path, body, headers=dict(self.headers))
                reply = upstream_conn.getresponse()
                data = reply.read()
                with lock:
                    counts[self.command] += 1
                if status == "lose":
                    upstream_conn.close()
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", reply.getheader("Content-Length") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.counts, self.peak, self._lock = counts, peak, lock
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> dict[str, int]:
        """The counts by method since the last take (forwarded requests only)."""
        with self._lock:
            counts = {k: v for k, v in self.counts.items() if k != "all"}
            for key in counts:
                del self.counts[key]
        return counts


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """Puts a counting (and, given `fault`, failing) proxy between every process of the test and moto's S3:
    `s3_proxy(fault=None)` -> the S3RequestCounter. moto itself stays reachable at `s3_server`."""
    proxies = []

    def start(fault=None) -> S3RequestCounter:
        proxy = S3RequestCounter(s3_server, fault)
        proxies.append(proxy)
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint)
        config = {**fsspec.config.conf.get("s3", {}), "endpoint_url": proxy.endpoint}
        monkeypatch.setitem(fsspec.config.conf, "s3", config)
        return proxy

    yield start
    for proxy in proxies:
        proxy.server.shutdown()


@pytest.fixture
def s3_requests(s3_proxy):
    """A counter of the S3 requests every process of the test makes (this one and its subprocesses)."""
    return s3_proxy()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server: yields "s3://<name>"."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)
    fs.invalidate_cache()


# ------------------------------------------------------------------------------- image folders


def _pixels(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what PIL cannot write (48-bit RGB) or must not check (bomb headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def odd_inputs(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected verdict: keep / convert / reject): every odd input the shard stage meets."""
    rgb = Image.fromarray(_pixels(rng, (20, 28, 3)), "RGB")
    rgb48 = rng.integers(0, 65536, size=(6, 5, 3), dtype=np.uint16).astype(">u2")
    rgb48_rows = b"".join(b"\x00" + row.tobytes() for row in rgb48)
    good_jpeg = _encode(rgb, "JPEG", quality=90)
    return {
        "cmyk.JPEG": (_encode(rgb.convert("CMYK"), "JPEG"), "convert"),
        "gray16.png": (_encode(Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)), "PNG"), "convert"),
        "rgb48.png": (png_bytes(5, 6, 16, 2, rgb48_rows), "convert"),
        "palette.png": (_encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "convert"),
        "rgba.png": (_encode(rgb.convert("RGBA"), "PNG"), "convert"),
        "la.png": (_encode(rgb.convert("LA"), "PNG"), "convert"),
        "png_named.JPEG": (_encode(rgb, "PNG"), "keep"),
        "truncated.JPEG": (good_jpeg[: len(good_jpeg) // 2], "reject"),
        "empty.JPEG": (b"", "reject"),
        "text.jpg": (b"this is not an image\n", "reject"),
        # A 100000 x 100000 header around a few bytes of data: must be rejected without decoding.
        "bomb.png": (png_bytes(100_000, 100_000, 8, 2, b"\x00" * 16), "reject"),
    }


@dataclass
class ImageFolderSpec:
    """A generated ImageFolder and what the shard stage should make of it."""

    root: Path
    classes: list[str]
    verdicts: dict[str, dict[str, str]] = field(default_factory=dict)  # split -> relpath -> keep/convert/reject
    ignored: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> manifest.ignored

    def accepted(self, split: str) -> dict[str, str]:
        return {p: v for p, v in self.verdicts[split].items() if v != "reject"}


def build_odd_image_folder(root: Path, per_class: int = 5, seed: int = 0) -> ImageFolderSpec:
    """train/ and val/ with plain JPEG/PNG (RGB and L) images, every odd input in train/cat, a hidden
    file and folder, a non-image file, and a file outside any class folder."""
    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "fish"]
    spec = ImageFolderSpec(root, classes)
    for split, split_classes, n in (("train", classes, per_class), ("val", classes[:2], 2)):
        verdicts = spec.verdicts.setdefault(split, {})
        for c in split_classes:
            for i in range(n):
                h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                if i % 2:
                    name, data = f"{c}_{i:03d}.JPEG", _encode(Image.fromarray(_pixels(rng, (h, w, 3))), "JPEG")
                else:
                    name, data = f"{c}_{i:03d}.png", _encode(Image.fromarray(_pixels(rng, (h, w))), "PNG")
                _write(root / split / c / name, data)
                verdicts[f"{c}/{name}"] = "keep"
        spec.ignored[split] = {"hidden": 0, "non_image": 0, "outside_class": 0}
    for name, (data, verdict) in odd_inputs(rng).items():
        _write(root / "train" / "cat" / name, data)
        spec.verdicts["train"][f"cat/{name}"] = verdict
    _write(root / "train" / "dog" / ".hidden.JPEG", b"\xff\xd8 hidden")
    _write(root / "train" / "dog" / ".thumbs" / "dog_000.JPEG", b"\xff\xd8 hidden folder")
    _write(root / "train" / "fish" / "notes.txt", b"not an image extension")
    _write(root / "train" / "LICENSE", b"outside any class folder")
    spec.ignored["train"] = {"hidden": 2, "non_image": 1, "outside_class": 1}
    return spec


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="session")
def odd_image_folder(tmp_path_factory) -> ImageFolderSpec:
    return build_odd_image_folder(tmp_path_factory.mktemp("odd") / "imagenet")


@pytest.fixture(scope="session")
def fmnist_folder(tmp_path_factory) -> Path:
    """200 train and 50 val images of the real Fashion-MNIST, as an ImageFolder of PNGs."""
    if not Path(FMNIST_SOURCE, "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from deit_pipe.pipeline.fashion_mnist import write_image_folder

    root = tmp_path_factory.mktemp("fmnist") / "fashion-mnist"
    write_image_folder(str(root), FMNIST_SOURCE, limit=200, val_limit=50)
    return root
