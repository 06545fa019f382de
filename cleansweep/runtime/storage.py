"""Where sweeps and pre-training runs keep their files: a local folder, or an object-storage URI (`s3://bucket/prefix`,
`gs://bucket/prefix`).

A URI stays a `str` all the way to Ray: `pathlib.Path` would fold its `//` (`s3://b/x` -> `s3:/b/x`). Ray Tune and
Train resolve a URI storage path with `pyarrow.fs.FileSystem.from_uri` (`ray/train/_internal/storage.py`,
`get_fs_and_path`), and so does this module, so both see the same bucket with the same credentials: for S3 the
standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ...), and `AWS_ENDPOINT_URL`
for an S3-compatible server (MinIO, Ceph, moto), which pyarrow's S3 filesystem honours as boto3 does; for GCS the
Google application-default credentials. A local path is handled with `pathlib`, as before.

`check_storage` lists the bucket once before anything starts, so a missing credential, an unreachable endpoint or
a missing bucket is one line naming the fix instead of a Ray traceback minutes later.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cleansweep.errors import UserError

SCHEMES = ("s3", "gs")
Location = str | Path  # a URI (str) or a local path


def is_remote(location: Location | None) -> bool:
    """Whether `location` is an object-storage URI (`s3://`, `gs://`)."""
    return isinstance(location, str) and urlsplit(location).scheme in SCHEMES


def parse_location(value: str | Path) -> Location:
    """A `--storage-path`-like value: an `s3://` / `gs://` URI as a normalised string, anything else as a `Path`.

    Raises:
        UserError: a URI of another scheme, or one without a bucket.
    """
    text = str(value)
    scheme = urlsplit(text).scheme if "://" in text else ""
    if not scheme:
        return Path(text)
    if scheme not in SCHEMES:
        raise UserError(f"storage {text!r}: unsupported scheme {scheme}://; use a local folder, s3://BUCKET/PREFIX "
                        "or gs://BUCKET/PREFIX")
    parts = urlsplit(text)
    if not parts.netloc:
        raise UserError(f"storage {text!r}: no bucket; write it as {scheme}://BUCKET/PREFIX")
    path = "/".join(p for p in parts.path.split("/") if p)
    return f"{scheme}://{parts.netloc}" + (f"/{path}" if path else "") + (f"?{parts.query}" if parts.query else "")


def location_value(value: str | Path | None) -> Location | None:
    """`parse_location` for a pydantic field validator: a bad URI is a ValueError (reported on its key)."""
    if value is None:
        return None
    try:
        return parse_location(value)
    except UserError as e:
        raise ValueError(str(e)) from None


def join(base: Location, *parts: str) -> Location:
    """`base / part / ...` for a path or a URI (a URI's query string, if any, stays at the end)."""
    if not is_remote(base):
        return Path(base).joinpath(*parts)
    head, _, query = str(base).partition("?")
    joined = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + (f"?{query}" if query else "")


def parent(location: Location) -> Location:
    """The folder holding `location`."""
    if not is_remote(location):
        return Path(location).parent
    head, _, query = str(location).partition("?")
    return head.rsplit("/", 1)[0] + (f"?{query}" if query else "")


def filesystem(uri: str):  # -> tuple[pyarrow.fs.FileSystem, str]
    """The pyarrow filesystem of a URI and the path inside it (what Ray resolves the same URI to)."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        raise UserError(_storage_problem(uri, e)) from None


def uri_of(fs, path: str) -> str:
    """A location Ray handed over as (filesystem, path): a URI for object storage, else the local path."""
    scheme = {"s3": "s3", "gcs": "gs"}.get(getattr(fs, "type_name", "local"))
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


def is_file(location: Location) -> bool:
    """Whether a file exists at `location`."""
    if not is_remote(location):
        return Path(location).is_file()
    import pyarrow.fs

    fs, path = filesystem(str(location))
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File


def exists(location: Location) -> bool:
    """Whether a file or a folder (for object storage: any object under the prefix) exists at `location`."""
    if not is_remote(location):
        return Path(location).exists()
    import pyarrow.fs

    fs, path = filesystem(str(location))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return True
    return bool(fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False)))


def list_files(location: Location) -> list[str]:
    """Every file under `location`, as paths relative to it, sorted."""
    if not is_remote(location):
        root = Path(location)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    import pyarrow.fs

    fs, path = filesystem(str(location))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pyarrow.fs.FileType.File)


def read_bytes(location: Location) -> bytes:
    """The content of the file at `location`."""
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: Location, data: bytes) -> None:
    """Write `data` to `location` (a local file atomically; an object is whole or absent by itself)."""
    if not is_remote(location):
        from cleansweep.runtime import atomic

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_atomic(Path(location), lambda tmp: Path(tmp).write_bytes(data))
        return
    fs, path = filesystem(str(location))
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(location: Location, data: object) -> None:
    """Write `data` as indented JSON (non-JSON values as strings) to `location` (see `write_bytes`)."""
    write_bytes(location, (json.dumps(data, indent=2, default=str) + "\n").encode())


def remove_file(location: Location) -> None:
    """Delete the file at `location`; nothing there is fine."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    if is_file(location):
        fs, path = filesystem(str(location))
        fs.delete_file(path)


def upload(local_file: Path, location: Location) -> None:
    """Copy a local file to `location`."""
    write_bytes(location, Path(local_file).read_bytes())


def download(location: Location, local_file: Path) -> Path:
    """Copy the file at `location` to `local_file`; returns `local_file`."""
    Path(local_file).write_bytes(read_bytes(location))
    return Path(local_file)


def fetch_checkpoint(uri: str, folder: Path, weights_name: str, what: str) -> Path:
    """Copy a checkpoint from object storage into local `folder`, each file atomically: the weights object `uri`, or
    `weights_name` under folder URI `uri`, and its card (the .json beside it; an earlier copy's card is removed when
    there is none). Returns the local weights file, which the project's safe loaders read as any local checkpoint.

    Raises:
        UserError: (prefixed with `what`, the flag or key that named it) neither object exists.
    """
    from cleansweep.runtime import atomic

    weights = uri if is_file(uri) else str(join(uri, weights_name))
    if not is_file(weights):
        raise UserError(f"{what} {uri}: no such object, nor {weights_name} under it; pass the URI of the weights or "
                        "of the folder holding them")
    name = Path(urlsplit(weights).path).name
    folder.mkdir(parents=True, exist_ok=True)
    local = atomic.write_atomic(folder / name, lambda tmp: download(weights, tmp))
    card = join(parent(weights), Path(name).with_suffix(".json").name)
    if is_file(card):
        atomic.write_atomic(local.with_suffix(".json"), lambda tmp: download(card, tmp))
    else:
        local.with_suffix(".json").unlink(missing_ok=True)
    return local


def remove_tree(location: Location) -> None:
    """Delete the folder (or prefix) `location` and everything under it; nothing there is fine."""
    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = filesystem(str(location))
    if exists(location):
        fs.delete_dir_contents(path, missing_dir_ok=True)


def local_staging(prefix: str) -> Path:
    """A fresh local temp folder (the caller removes it) for files on their way to or from object storage."""
    return Path(tempfile.mkdtemp(prefix=f"cleansweep-{prefix}-"))


def check_storage(location: Location | None) -> None:
    """Refuse an object-storage location that cannot be used, before anything starts: list it once.

    A local path (or None) passes. For S3, credentials must be configured: the AWS variables, `AWS_PROFILE` (on an
    instance role: a profile with `credential_source = Ec2InstanceMetadata`), a shared credentials file, web identity
    or container credentials.

    Raises:
        UserError: one line: no credentials, endpoint unreachable, bucket missing or access denied, with the fix.
    """
    if not is_remote(location):
        return
    uri = str(parse_location(str(location)))
    if uri.startswith("s3://") and not _aws_credentials_configured():
        raise UserError(f"storage {uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                        "AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible server")
    import pyarrow
    import pyarrow.fs

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
        if found:  # a listing without a bucket reads as empty: the bucket is asked for on its own first
            fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False))
    except (OSError, pyarrow.ArrowException) as e:
        raise UserError(_storage_problem(uri, e)) from None
    if not found:
        raise UserError(f"storage {uri}: bucket {bucket!r} does not exist; create it first or fix the URI")


def _aws_credentials_configured() -> bool:
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or str(Path.home() / ".aws" / "credentials")
    return Path(shared).is_file()


def _storage_problem(uri: str, error: BaseException) -> str:
    """One line for an error pyarrow raised about `uri` (the AWS SDK's error names are matched, not its wording)."""
    text = " ".join(str(error).split())
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or ("the S3 endpoint" if uri.startswith("s3://") else "GCS")
    bucket = urlsplit(uri).netloc
    if any(k in text for k in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "resolve host")):
        return (f"storage {uri}: cannot reach {endpoint}; check AWS_ENDPOINT_URL and the network, or use a local "
                "--storage-path")
    if any(k in text for k in ("NO_SUCH_BUCKET", "does not exist", "NoSuchBucket", "not found")):
        return f"storage {uri}: bucket {bucket!r} does not exist; create it first or fix the URI"
    if any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                               "403", "credentials")):
        return f"storage {uri}: access denied; check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the " \
               "bucket's permissions"
    first = text[:200]
    return f"storage {uri}: cannot be listed ({first}); check the URI, the credentials and the endpoint"
