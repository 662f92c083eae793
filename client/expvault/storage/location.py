"""Where a store keeps its vaults: a local directory, or any tensorstore key-value store.

The storage engine never touches files or objects itself: it asks its `Location` to read and write
the small JSON documents, the write-ahead log segments, and for the base key-value store under
each stream's OCDBT database, and it asks it for the right to write a stream:

- `FileLocation`: a local directory. Atomic renames, fsync, an `flock` per stream (released
  by the kernel the moment its process dies), and log segments appended to log files
  (`expvault.storage.logfiles`).
- `KvLocation`: a tensorstore key-value store: `s3://`, `gs://`, `memory://`, or any kvstore spec.
  Writes of one object are atomic; a stream's writer holds a `Lease` (see `expvault.storage.lease`)
  that other servers see, renewed in the background, with fencing for a writer that lost it.

Both hold the same layout: `<vault>/vault.json`, `<vault>/<uid>/metadata.json`, the OCDBT database
of `<vault>/<uid>/`, and the write-ahead log in `<vault>/<uid>/wal/`: one object per segment,
`<start>-<stop>[-<epoch>].seg`, on a key-value store; records in `<start>.log` files in a
directory (which also reads `.seg` files, as earlier versions wrote them there).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tensorstore as ts

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

from expvault.errors import InvalidArgumentError, ResourceExhaustedError, StorageError
from expvault.storage import files
from expvault.storage.files import SegmentName
from expvault.storage.logfiles import LogFiles

WAL_DIR = files.WAL_DIR
# tensorstore's generation of a key that does not exist: `if_equal=NO_VALUE` creates only.
NO_VALUE = b"\x02"
_URL_SCHEMES = ("file://", "memory://", "s3://", "gs://", "gcs://")


class Location:
    """The place a store's vaults live in. Keys are `/`-separated and relative to it."""

    url: str
    context: ts.Context

    def describe(self, key: str = "") -> str:
        """`key` as a user would look for it (a path or a URL), for messages."""
        raise NotImplementedError

    def local_path(self, key: str = "") -> Path:
        """`key` as a local path; raises StorageError for a location that is not a directory."""
        raise StorageError(f"{self.describe(key)} is not a local directory")

    def kvstore(self, key: str) -> dict[str, Any]:
        """The tensorstore kvstore spec of the directory `key` (the base of a stream's OCDBT)."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        """Whether the document or object `key` exists."""
        raise NotImplementedError

    def read_json(self, key: str) -> Any:
        """Reads a JSON document; StorageError when it is missing, unreadable or not JSON."""
        raise NotImplementedError

    def write_json(self, key: str, value: Any, *, create_only: bool = False) -> bool:
        """Writes a JSON document atomically and durably.

        Returns:
            False when `create_only` and it exists already (nothing written), else True.
        """
        raise NotImplementedError

    def list_children(self, key: str) -> list[str]:
        """Names directly under the directory `key` that hold something, sorted."""
        raise NotImplementedError

    def segments(self, stream: str) -> list[SegmentName]:
        """The stream's complete write-ahead log segments, unordered."""
        raise NotImplementedError

    def read_segment(self, stream: str, name: SegmentName) -> bytes:
        """A segment's bytes; FileNotFoundError when it was deleted meanwhile."""
        raise NotImplementedError

    def write_segment(self, stream: str, name: SegmentName, chunks: Sequence[Any]) -> None:
        """Writes a segment atomically; durable when it returns (raises OSError or ValueError)."""
        raise NotImplementedError

    def remove_segment(self, stream: str, name: SegmentName) -> None:
        """Deletes a segment, ignoring one that is already gone."""
        raise NotImplementedError

    def remove_temporary(self, stream: str) -> None:
        """Deletes what a crashed writer left half-written (the stream's writer only)."""

    def release_log(self, stream: str) -> None:
        """The stream's writer stopped: lets go of what it kept for writing the log."""

    def bytes_used(self, key: str) -> int:
        """Bytes stored under `key`; 0 where the location cannot tell cheaply."""
        return 0

    def create_stream(self, stream: str, build: Callable[[str], None]) -> None:
        """Creates the stream directory `stream` with `build(key)`, as atomically as it can.

        `build` writes the arrays and, last, `metadata.json` under the key it is given.
        """
        raise NotImplementedError

    def delete_tree(self, key: str) -> None:
        """Deletes the directory `key` and everything under it."""
        raise NotImplementedError

    def make_dir(self, key: str) -> None:
        """Makes the directory `key` (a no-op where directories are implicit)."""

    def error(self, action: str, error: BaseException) -> StorageError | ResourceExhaustedError:
        """Turns a failure of the location into the error a client should see."""
        raise NotImplementedError

    @property
    def shared(self) -> bool:
        """Whether other processes may write here, so a writer needs a lease (object stores)."""
        return False


class FileLocation(Location):
    """A local directory (the default); its write-ahead logs are `LogFiles`."""

    def __init__(self, root: str | os.PathLike[str], context: ts.Context) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)
        self.context = context
        self._logs = LogFiles(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise files.os_error(f"cannot create the storage root {self.root}", e) from e

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    @override
    def describe(self, key: str = "") -> str:
        return str(self._path(key))

    @override
    def local_path(self, key: str = "") -> Path:
        return self._path(key)

    @override
    def kvstore(self, key: str) -> dict[str, Any]:
        return {"driver": "file", "path": f"{self._path(key)}/"}

    @override
    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    @override
    def read_json(self, key: str) -> Any:
        return files.read_json(self._path(key))

    @override
    def write_json(self, key: str, value: Any, *, create_only: bool = False) -> bool:
        path = self._path(key)
        if create_only and path.exists():
            return False
        files.write_json(path, value)
        return True

    @override
    def list_children(self, key: str) -> list[str]:
        try:
            entries = sorted(os.listdir(self._path(key)))
        except FileNotFoundError:
            return []
        return [e for e in entries if (self._path(key) / e).is_dir()]

    @override
    def segments(self, stream: str) -> list[SegmentName]:
        return self._logs.segments(stream)

    @override
    def read_segment(self, stream: str, name: SegmentName) -> bytes:
        return self._logs.read(stream, name)

    @override
    def write_segment(self, stream: str, name: SegmentName, chunks: Sequence[Any]) -> None:
        self._logs.write(stream, name, chunks)

    @override
    def remove_segment(self, stream: str, name: SegmentName) -> None:
        self._logs.remove(stream, name)

    @override
    def remove_temporary(self, stream: str) -> None:
        files.remove_temporary(self._path(stream))
        self._logs.clean(stream)

    @override
    def release_log(self, stream: str) -> None:
        self._logs.release(stream)

    @override
    def bytes_used(self, key: str) -> int:
        return files.bytes_on_disk(self._path(key))

    @override
    def create_stream(self, stream: str, build: Callable[[str], None]) -> None:
        vault, uid = stream.split("/")
        staging = f"{vault}/.creating-{uid}-{uuid.uuid4().hex}"
        final = self._path(stream)
        try:
            self._path(staging).mkdir()
            build(staging)
            os.replace(self._path(staging), final)
            files.fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(self._path(staging), ignore_errors=True)
            if final.exists():
                raise StorageError(f"stream {stream} was created concurrently") from None
            raise

    @override
    def delete_tree(self, key: str) -> None:
        # Rename first so a crash never leaves a half-deleted vault that looks valid.
        doomed = self.root / f".deleted-{key.replace('/', '-')}-{uuid.uuid4().hex}"
        os.replace(self._path(key), doomed)
        self._logs.forget(key)
        files.fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    @override
    def make_dir(self, key: str) -> None:
        self._path(key).mkdir(exist_ok=True)
        files.fsync_dir(self._path(key).parent)

    @override
    def error(self, action: str, error: BaseException) -> StorageError | ResourceExhaustedError:
        return files.storage_error(action, error, self.root)


class KvLocation(Location):
    """Any tensorstore key-value store: S3 and S3-compatible stores, Google Cloud Storage, memory.

    Args:
        spec: the kvstore spec (JSON) of the root; its `path` ends with `/` or is empty.
        url: how to show the root in messages.
        context: the tensorstore context every array of the store shares.
    """

    def __init__(self, spec: dict[str, Any], url: str, context: ts.Context) -> None:
        path = str(spec.get("path", ""))
        if path and not path.endswith("/"):
            path += "/"
        self.spec = {**spec, "path": path}
        self.url = url
        self.context = context
        try:
            self._kv = ts.KvStore.open(self.spec, context=context).result()
        except ValueError as e:
            raise StorageError(f"cannot open the storage location {url}: {e}") from e

    @override
    def describe(self, key: str = "") -> str:
        if not key:
            return self.url
        return f"{self.url}{key}" if self.url.endswith("/") else f"{self.url}/{key}"

    @override
    def kvstore(self, key: str) -> dict[str, Any]:
        return {**self.spec, "path": f"{self.spec['path']}{key}/"}

    @property
    @override
    def shared(self) -> bool:
        return self.spec.get("driver") != "memory"

    def _read(self, key: str) -> bytes | None:
        return self.read_with_generation(key)[0]

    def read_with_generation(self, key: str) -> tuple[bytes | None, bytes]:
        """A key's value (None: missing) and its generation, for a later conditional write."""
        try:
            result = self._kv.read(key).result()
        except ValueError as e:
            raise self.error(f"cannot read {self.describe(key)}", e) from e
        value = None if result.state == "missing" else bytes(result.value)
        return value, bytes(result.stamp.generation)

    def write_if(self, key: str, value: bytes, generation: bytes) -> bytes | None:
        """Writes `value` if `key` still has `generation`; returns the new one, None if it had not.

        Raises:
            StorageError: the store failed (or does not support conditional writes).
        """
        try:
            stamp = self._kv.write(key, value, if_equal=generation).result()
        except ValueError as e:
            raise self.error(f"cannot write {self.describe(key)}", e) from e
        new = bytes(stamp.generation)
        return new or None

    @override
    def exists(self, key: str) -> bool:
        return self._read(key) is not None

    @override
    def read_json(self, key: str) -> Any:
        data = self._read(key)
        if data is None:
            raise StorageError(f"{self.describe(key)} is missing")
        try:
            return json.loads(data)
        except ValueError as e:
            raise StorageError(f"cannot parse {self.describe(key)}: {e}") from e

    @override
    def write_json(self, key: str, value: Any, *, create_only: bool = False) -> bool:
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        try:
            stamp = self._kv.write(key, data, if_equal=NO_VALUE if create_only else None).result()
        except ValueError as e:
            raise self.error(f"cannot write {self.describe(key)}", e) from e
        return bool(stamp.generation) or not create_only

    def _list(self, prefix: str) -> list[str]:
        try:
            keys = self._kv.list(
                _prefix_range(prefix), strip_prefix_length=len(prefix.encode())
            ).result()
        except ValueError as e:
            raise self.error(f"cannot list {self.describe(prefix)}", e) from e
        return [k.decode() for k in keys]

    @override
    def list_children(self, key: str) -> list[str]:
        prefix = f"{key}/" if key else ""
        return sorted({k.split("/", 1)[0] for k in self._list(prefix) if "/" in k})

    @override
    def segments(self, stream: str) -> list[SegmentName]:
        names = self._list(f"{stream}/{WAL_DIR}/")
        return [s for s in map(SegmentName.parse, names) if s is not None]

    @override
    def read_segment(self, stream: str, name: SegmentName) -> bytes:
        data = self._read(f"{stream}/{WAL_DIR}/{name.name}")
        if data is None:
            raise FileNotFoundError(name.name)
        return data

    @override
    def write_segment(self, stream: str, name: SegmentName, chunks: Sequence[Any]) -> None:
        data = b"".join(memoryview(c).cast("B") for c in chunks)
        self._kv.write(f"{stream}/{WAL_DIR}/{name.name}", data).result()

    @override
    def remove_segment(self, stream: str, name: SegmentName) -> None:
        with contextlib.suppress(ValueError):  # left behind: ignored once materialized
            self._kv.write(f"{stream}/{WAL_DIR}/{name.name}", None).result()

    @override
    def create_stream(self, stream: str, build: Callable[[str], None]) -> None:
        # No rename on object stores: build in place; metadata.json, written last and only if
        # absent, makes the stream exist. A crash before it leaves arrays that a retry reuses.
        build(stream)

    @override
    def delete_tree(self, key: str) -> None:
        try:
            self._kv.delete_range(_prefix_range(f"{key}/")).result()
        except ValueError as e:
            raise self.error(f"cannot delete {self.describe(key)}", e) from e

    @override
    def error(self, action: str, error: BaseException) -> StorageError | ResourceExhaustedError:
        text = str(error)
        if "RESOURCE_EXHAUSTED" in text or "quota" in text.lower():
            return ResourceExhaustedError(f"{action}: the store {self.url} is full: {text}")
        return StorageError(f"{action}: {text}")


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """The keys that start with `prefix` (all keys for "")."""
    if not prefix:
        return ts.KvStore.KeyRange()
    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def open_location(
    root: str | os.PathLike[str] | dict[str, Any],
    context: ts.Context,
    *,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
) -> Location:
    """The location `root` names.

    Args:
        root: a directory; `file://DIR`; `memory://`; `s3://BUCKET/PREFIX`; `gs://BUCKET/PREFIX`;
            or a tensorstore kvstore spec (a dict, or its JSON text).
        context: the store's tensorstore context.
        s3_endpoint: the S3 endpoint URL (S3-compatible stores); default `AWS_ENDPOINT_URL`.
        s3_region: the S3 region; default `AWS_REGION`, `AWS_DEFAULT_REGION`, else us-east-1
            when an endpoint is given.

    Raises:
        InvalidArgumentError: a URL or spec tensorstore does not accept.
    """
    if isinstance(root, os.PathLike):
        return FileLocation(root, context)
    if isinstance(root, str) and root.lstrip().startswith("{"):
        try:
            root = json.loads(root)
        except ValueError as e:
            raise InvalidArgumentError(f"the storage location is not valid JSON: {e}") from e
    if isinstance(root, str):
        if root.startswith("file://"):
            return FileLocation(root.removeprefix("file://"), context)
        if not root.startswith(_URL_SCHEMES):
            if "://" in root:
                raise InvalidArgumentError(
                    f"storage location {root!r}: use a directory, file://DIR, memory://, "
                    "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a tensorstore kvstore spec"
                )
            return FileLocation(root, context)
        url = root.replace("gcs://", "gs://", 1)
        try:
            spec = ts.KvStore.Spec(url if url.endswith("/") else url + "/").to_json()
        except ValueError as e:
            raise InvalidArgumentError(f"storage location {root!r} is not valid: {e}") from e
    elif isinstance(root, dict):
        spec, url = dict(root), json.dumps(root, sort_keys=True)
    else:
        raise InvalidArgumentError(f"storage location {root!r} must be a path, URL or spec")
    if spec.get("driver") == "file":
        return FileLocation(spec.get("path", "."), context)
    if spec.get("driver") == "s3":
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
        region = s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            spec.setdefault("endpoint", endpoint)
            spec.setdefault("aws_region", region or "us-east-1")
            # tensorstore sends If-Match only to amazonaws endpoints unless told; leases and
            # fencing need conditional writes (SeaweedFS, MinIO, Ceph and AWS S3 have them).
            os.environ.setdefault("TENSORSTORE_S3_USE_CONDITIONAL_WRITE", "1")
        elif region:
            spec.setdefault("aws_region", region)
    return KvLocation(spec, url, context)
