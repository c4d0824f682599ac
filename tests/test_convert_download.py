"""--download: MD5 check, resume of a partial download with HTTP Range, restart when the server ignores Range,
the offline message (which file, from where, to where), and an end-to-end fetch + convert — all against a tiny
HTTP server on 127.0.0.1 or file:// URLs, never another host."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from loaders.convert import download as dl
from loaders.sidecar import DatasetFileError, read_sidecar
from test_convert_support import listing, make_cifar10, run_convert_cli


class _Server:
    """Serves `files` {name: bytes} on 127.0.0.1, honouring `Range: bytes=N-` when `ranges` is True."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        self.files, self.ranges, self.requests = files, ranges, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                name = self.path.lstrip("/")
                outer.requests.append((name, self.headers.get("Range")))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                rng = self.headers.get("Range")
                if rng and outer.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    body = data[start:]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.bytes_sent += len(body)

            def log_message(self, *args):
                pass

        self.bytes_sent = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now


BLOB = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
BLOB_MD5 = hashlib.md5(BLOB).hexdigest()


def _resource(url: str, md5: str = BLOB_MD5) -> dl.Resource:
    return dl.Resource("blob.bin", url + "/blob.bin", md5)


def test_fresh_download_verified(tmp_path):
    with _Server({"blob.bin": BLOB}) as srv:
        path = dl.fetch(_resource(srv.url), tmp_path, progress=False)
    assert path.read_bytes() == BLOB and listing(tmp_path) == ["blob.bin"]


def test_resume_partial_download_with_range(tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:123_456])
    with _Server({"blob.bin": BLOB}) as srv:
        path = dl.fetch(_resource(srv.url), tmp_path, progress=False)
        assert srv.requests == [("blob.bin", "bytes=123456-")]
        assert srv.bytes_sent == len(BLOB) - 123_456
    assert path.read_bytes() == BLOB and listing(tmp_path) == ["blob.bin"]


def test_server_without_range_restarts_from_zero(tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes that are not the file")
    with _Server({"blob.bin": BLOB}, ranges=False) as srv:
        path = dl.fetch(_resource(srv.url), tmp_path, progress=False)
        assert srv.bytes_sent == len(BLOB)
    assert path.read_bytes() == BLOB


def test_complete_part_file_and_416(tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(BLOB)
    with _Server({"blob.bin": BLOB}) as srv:
        path = dl.fetch(_resource(srv.url), tmp_path, progress=False)
    assert path.read_bytes() == BLOB


def test_md5_mismatch_removes_part_and_says_so(tmp_path):
    with _Server({"blob.bin": BLOB}) as srv:
        with pytest.raises(DatasetFileError) as info:
            dl.fetch(_resource(srv.url, md5="0" * 32), tmp_path, progress=False)
    msg = str(info.value)
    assert str(tmp_path / "blob.bin") in msg and BLOB_MD5 in msg and "0" * 32 in msg
    assert listing(tmp_path) == []


def test_existing_file_with_wrong_md5_is_not_touched(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"something else")
    with pytest.raises(DatasetFileError, match="differs from the published"):
        dl.fetch(_resource(_closed_port_url()), tmp_path, progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == b"something else"


def test_file_url(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blob.bin").write_bytes(BLOB)
    path = dl.fetch(_resource((tmp_path / "src").as_uri()), tmp_path / "dl", progress=False)
    assert path.read_bytes() == BLOB


def test_offline_says_which_file_to_place_where(tmp_path):
    res = _resource(_closed_port_url())
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:10])
    with pytest.raises(DatasetFileError) as info:
        dl.fetch(res, tmp_path, progress=False)
    msg = str(info.value)
    assert f"place it at {tmp_path / 'blob.bin'}" in msg and res.url in msg and BLOB_MD5 in msg
    assert "kept and resumed" in msg and (tmp_path / "blob.bin.part").read_bytes() == BLOB[:10]


def test_cli_offline_and_missing_messages(tmp_path, capsys):
    rc, _, err = run_convert_cli(capsys, "cifar10", "--download", "--mirror", _closed_port_url(),
                                 "--out", str(tmp_path / "out"))
    dest = tmp_path / "out" / "downloads" / "cifar-10-python.tar.gz"
    assert rc == 2 and f"place it at {dest}" in err and "c58f30108f718f92721af3b95e74349a" in err
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err
    rc, _, err = run_convert_cli(capsys, "svhn", "--splits", "test", "--out", str(tmp_path / "out"))
    assert rc == 2 and "--download" in err and str(tmp_path / "out" / "downloads" / "test_32x32.mat") in err
    assert not list((tmp_path / "out").glob("*.beton"))


def test_cli_download_then_convert(tmp_path, capsys, monkeypatch):
    """End to end through a mirror: a generated CIFAR-10 archive stands in for the official one."""
    src, expected, _ = make_cifar10(tmp_path / "src")
    data = src.read_bytes()
    monkeypatch.setitem(dl.RESOURCES, "cifar10", [dl.Resource("cifar-10-python.tar.gz", "https://unused.invalid/x",
                                                              hashlib.md5(data).hexdigest())])
    with _Server({"cifar-10-python.tar.gz": data}) as srv:
        rc, out, err = run_convert_cli(capsys, "cifar10", "--download", "--mirror", srv.url,
                                       "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert (tmp_path / "out" / "downloads" / "cifar-10-python.tar.gz").read_bytes() == data
    meta = read_sidecar(tmp_path / "out" / "test.beton")
    assert meta["num_images"] == len(expected["test"][1])
    assert meta["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert Path(meta["source"]["path"]).name == "cifar-10-python.tar.gz"
