"""A throwaway S3-compatible server on loopback for the object-storage tests (the `s3` fixture of conftest.py).

moto's standalone S3 HTTP server (`moto[server]`, a dev extra) on 127.0.0.1 and a free port, one bucket, and the
AWS variables pointing at it: pyarrow's S3 filesystem (the code path Ray and `runtime.storage` use) talks to it over
HTTP exactly as to AWS S3 or MinIO. Tests check what landed with pyarrow's own `S3FileSystem` (`bucket_objects`), not
with the module under test.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

BUCKET = "cleansweep-test"


def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """Start the server, reset it to one empty bucket, set the AWS variables; yields (endpoint, fs, pafs)."""
    pafs = pytest.importorskip("pyarrow.fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets per process, not per server: start each test from none.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    try:
        yield SimpleNamespace(endpoint=endpoint, fs=fs, pafs=pafs)
    finally:
        server.stop()


def bucket_objects(s3: SimpleNamespace, prefix: str) -> dict[str, int]:
    """Every object under `prefix` of the bucket -> its size, listed with pyarrow's own S3 filesystem."""
    infos = s3.fs.get_file_info(s3.pafs.FileSelector(f"{BUCKET}/{prefix}", allow_not_found=True, recursive=True))
    return {i.path[len(BUCKET) + 1:]: i.size for i in infos if i.type == s3.pafs.FileType.File}


def read_object(s3: SimpleNamespace, key: str) -> bytes:
    """The bytes of object `key` of the bucket, read with pyarrow's own S3 filesystem."""
    with s3.fs.open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read()


def break_access(monkeypatch: pytest.MonkeyPatch, case: str, tmp_path: Path) -> None:
    """Make the server unusable as `case` says: "no credentials" (no AWS keys, no credentials file) or "unreachable"
    (the endpoint is a loopback port nobody listens on); any other case leaves it as it is."""
    if case == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    if case == "unreachable":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
