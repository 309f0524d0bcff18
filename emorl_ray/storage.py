"""Where a run's files live: a local directory or a storage URI (`s3://`, `gs://`, `file://`, ...).

Locations are plain strings, so they travel to Ray workers and into JSON manifests as they are.
Local paths are kept absolute; `file://` URIs become local paths; any other URI is opened with
`pyarrow.fs` (the same filesystem layer Ray Train and Tune use for their `storage_path`), which
takes credentials and endpoints from the usual places (`AWS_*` variables, `~/.aws`, GCP application
default credentials; `AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO).

Every write is atomic for a reader: a local file is written next to its target and renamed over
it; an object is written with one upload that becomes visible only when it completes. A directory
on object storage (an adapter) cannot be renamed into place: its files are uploaded first and the
manifest that names it is written after, so a reader that trusts the manifest sees a whole adapter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

# Schemes pyarrow.fs opens without extra packages (Azure and HDFS need their client libraries).
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")


def is_uri(location: str) -> bool:
    return "://" in str(location)


def normalize(location: str | os.PathLike) -> str:
    """An absolute local path, or the URI without a trailing slash."""
    location = str(location)
    if location.startswith("file://"):
        return str(Path(urlparse(location).path).resolve())
    if is_uri(location):
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def check_location(location: str) -> str | None:
    """What is wrong with `location` as a place to keep runs, or None. Opens no connection."""
    if not is_uri(location):
        return None
    scheme = urlparse(str(location)).scheme
    if scheme not in URI_SCHEMES:
        schemes = ", ".join(s + "://" for s in URI_SCHEMES)
        return f"unsupported URI scheme {scheme!r}; use a local path or one of {schemes}"
    if scheme != "file" and not urlparse(str(location)).netloc:
        return f"{location!r} names no bucket; write it as {scheme}://<bucket>/<prefix>"
    return None


def join(location: str, *parts: str) -> str:
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def parent(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)


def _fs(location: str):
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), normalize(location)


def _info(location: str):
    fs, path = _fs(location)
    return fs.get_file_info(path)


def is_file(location: str) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def exists(location: str) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


# --- reading ---------------------------------------------------------------------------------------

def read_bytes(location: str) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = _fs(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str):
    return json.loads(read_text(location))


def read_parquet(location: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(read_bytes(location))).to_pylist()


def listdir(location: str) -> list[tuple[str, float]]:
    """(name, modification time) of the entries directly under `location`; [] where there is none."""
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    return [(i.base_name, i.mtime.timestamp() if i.mtime else 0.0) for i in infos]


# --- writing ---------------------------------------------------------------------------------------

def write_bytes(location: str, data: bytes) -> None:
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = _fs(location)
    # The whole content goes in one call: the stream's upload completes at close, so an error
    # before that leaves the previous object (or none), never a prefix of this one.
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str, obj) -> None:
    write_text(location, json.dumps(obj, indent=2, default=str) + "\n")


def write_parquet(location: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Every key of every row: from_pylist would take the columns of the first row only.
    columns = dict.fromkeys(k for r in rows for k in r)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in columns}), buf)
    write_bytes(location, buf.getvalue())


def remove_file(location: str) -> None:
    if not is_uri(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def remove_dir(location: str) -> None:
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _fs(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def upload_dir(local: str | os.PathLike, location: str) -> None:
    """Make `location` a copy of the local directory `local` (what was there is replaced)."""
    if not is_uri(location):
        dst = Path(location)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
        try:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    import pyarrow.fs as pafs

    remove_dir(location)
    fs, path = _fs(location)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _cache_path(location: str, files: list[tuple], cache_dir) -> Path:
    """This node's copy of `location`, keyed by the URI and what is stored there (path, size,
    mtime of each file): a changed object is fetched again, an unchanged one never."""
    from emorl_ray.models import default_cache_dir

    key = hashlib.sha256(json.dumps([location, sorted(files)], default=str).encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / "remote" / key


def local_dir(location: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local directory with the content of `location`: itself when local, else a copy in the
    node's cache, keyed by the URI and what is stored there (a changed adapter is fetched again)."""
    if not is_uri(location):
        return normalize(location)
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if not infos:
        raise FileNotFoundError(f"{location} holds no files")
    target = _cache_path(location, [(i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File],
                         cache_dir)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():  # not merely a lost race with another process on this node
                raise
    return str(target)


def local_file(location: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local path with the content of the file at `location` (fetched into the cache if remote)."""
    if not is_uri(location):
        return normalize(location)
    info = _info(location)
    target = _cache_path(location, [(info.path, info.size, info.mtime_ns)], cache_dir) / basename(location)
    if not target.is_file():
        write_bytes(str(target), read_bytes(location))
    return str(target)
