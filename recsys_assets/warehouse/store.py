"""One module owns all storage I/O: local folder or S3, through fsspec.

`RECSYS_WAREHOUSE_URL` picks the warehouse: `file:///abs/path` (default `.warehouse/` under
the working directory) or `s3://bucket/prefix`; `AWS_ENDPOINT_URL` points S3 at MinIO or a
test server. Paths handed to this module are relative to the warehouse root and use `/`.

Every object write is atomic for readers: locally the bytes go to a temp file in the same
folder and are renamed over the target; on S3 an object becomes visible only when its PUT
(or multipart upload) completes. Conditional writes (`write_bytes_if`) guard manifests
against concurrent publishers: on S3 with `If-Match` / `If-None-Match`, locally with an
exclusive OS file lock (flock) around compare-and-rename.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

WAREHOUSE_ENV_VAR = "RECSYS_WAREHOUSE_URL"
DEFAULT_LOCAL_DIR = ".warehouse"
_LOCK_TIMEOUT_S = 30.0
_LOCK_PREFIX = ".lock-"
"""Lock files stay in place (deleting a flock file would let two holders lock different
inodes); the prefix keeps them out of listings, like temp files."""
_HIDDEN_PREFIXES = (".tmp-", _LOCK_PREFIX)


class WarehouseError(RuntimeError):
    """A storage operation failed; the message names the warehouse path."""


class PreconditionFailed(WarehouseError):
    """A conditional write lost a race: the object changed since it was read."""


def partition_path(*, surface: str, region: str) -> str:
    """Hive-style path segment for one surface × region partition."""
    return f"surface={surface}/region={region}"


def _default_url() -> str:
    return (Path.cwd() / DEFAULT_LOCAL_DIR).resolve().as_uri()


@dataclass
class Warehouse:
    """A warehouse rooted at `url` (file:// or s3://)."""

    url: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    root: str = field(init=False)
    is_local: bool = field(init=False)

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme in ("", "file"):
            local = Path(parsed.path if parsed.scheme else self.url).expanduser().resolve()
            self.url = local.as_uri()
            self.fs = fsspec.filesystem("file")
            self.root = str(local)
            self.is_local = True
            local.mkdir(parents=True, exist_ok=True)
        elif parsed.scheme in ("s3", "s3a"):
            if not parsed.netloc:
                raise WarehouseError(f"{WAREHOUSE_ENV_VAR}={self.url!r}: no bucket in the URL")
            options: dict[str, Any] = {}
            if endpoint := os.environ.get("AWS_ENDPOINT_URL"):
                options["endpoint_url"] = endpoint
            # Fresh instances: s3fs caches listings, and a stale listing would hide new versions.
            self.fs = fsspec.filesystem(
                "s3", skip_instance_cache=True, use_listings_cache=False, **options
            )
            self.root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
            self.url = f"s3://{self.root}"
            self.is_local = False
        else:
            raise WarehouseError(
                f"{WAREHOUSE_ENV_VAR}={self.url!r}: unsupported scheme {parsed.scheme!r} "
                "(use file:///abs/path or s3://bucket/prefix)"
            )

    @classmethod
    def from_env(cls) -> Warehouse:
        """The warehouse named by RECSYS_WAREHOUSE_URL, or `.warehouse/` here."""
        return cls(os.environ.get(WAREHOUSE_ENV_VAR) or _default_url())

    # -- paths -------------------------------------------------------------------------

    def path(self, relative: str) -> str:
        """Filesystem path (as `self.fs` wants it) of a warehouse-relative path."""
        relative = relative.strip("/")
        if ".." in relative.split("/"):
            raise WarehouseError(f"path escapes the warehouse: {relative!r}")
        return f"{self.root}/{relative}" if relative else self.root

    def uri(self, relative: str) -> str:
        """Full URL of a warehouse-relative path, for messages and lineage."""
        return f"{self.url}/{relative.strip('/')}"

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.path(relative)))

    def list(self, prefix: str, *, suffix: str = "") -> list[str]:
        """Warehouse-relative paths of the files directly under `prefix`, sorted."""
        base = self.path(prefix)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        root = self.root + "/"
        names = [
            entry["name"].removeprefix(root)
            for entry in entries
            if entry["type"] == "file" and entry["name"].endswith(suffix)
        ]
        return sorted(name for name in names if not Path(name).name.startswith(_HIDDEN_PREFIXES))

    def list_dirs(self, prefix: str) -> list[str]:
        """Names (not paths) of the folders directly under `prefix`, sorted."""
        try:
            entries = self.fs.ls(self.path(prefix), detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            entry["name"].rstrip("/").rsplit("/", 1)[-1]
            for entry in entries
            if entry["type"] == "directory"
        )

    def info(self, relative: str) -> dict[str, Any]:
        return self.fs.info(self.path(relative))

    def delete(self, relative: str, *, recursive: bool = False) -> None:
        target = self.path(relative)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=recursive)

    # -- bytes -------------------------------------------------------------------------

    def read_bytes(self, relative: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError:
            raise FileNotFoundError(f"not in the warehouse: {self.uri(relative)}") from None

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write an object atomically: readers see the old bytes or the new, never half."""
        target = self.path(relative)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            temp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise
        else:
            self.fs.pipe_file(target, data)

    def etag(self, relative: str) -> str | None:
        """A version tag for conditional writes: the S3 ETag, or a local content stamp."""
        target = self.path(relative)
        if self.is_local:
            try:
                stat = os.stat(target)
            except FileNotFoundError:
                return None
            return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"
        try:
            return str(self.fs.info(target)["ETag"])
        except FileNotFoundError:
            return None

    def write_bytes_if(self, relative: str, data: bytes, *, expected_etag: str | None) -> None:
        """Write only if the object is still at `expected_etag` (None: must not exist).

        Raises PreconditionFailed when another writer got there first, so the caller can
        re-read and retry instead of losing the other writer's update.
        """
        target = self.path(relative)
        if not self.is_local:
            condition = (
                {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
            )
            try:
                self.fs.pipe_file(target, data, **condition)
            except OSError as error:  # s3fs turns S3's 412 into FileExistsError
                if isinstance(error, FileExistsError) or "pre-condition" in str(error).lower():
                    raise PreconditionFailed(f"{self.uri(relative)} changed concurrently") from None
                raise
            return
        with self._local_lock(target):
            if self.etag(relative) != expected_etag:
                raise PreconditionFailed(f"{self.uri(relative)} changed concurrently")
            self.write_bytes(relative, data)

    @contextlib.contextmanager
    def _local_lock(self, target: str) -> Iterator[None]:
        """An OS lock (flock) beside `target`: released by the kernel when its holder dies,
        so a killed publisher never blocks the next one and no waiter has to judge whether
        a lock is orphaned (two waiters judging at once could free a live holder's lock)."""
        folder, name = os.path.split(target)
        os.makedirs(folder, exist_ok=True)
        lock = FileLock(os.path.join(folder, f"{_LOCK_PREFIX}{name}"), timeout=_LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:
            raise WarehouseError(f"timed out waiting for lock {lock.lock_file}") from None
        try:
            yield
        finally:
            lock.release()

    # -- JSON --------------------------------------------------------------------------

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def write_json(self, relative: str, value: Any) -> None:
        self.write_bytes(relative, _json_bytes(value))

    # -- Parquet -----------------------------------------------------------------------

    def write_parquet(self, relative: str, frame: pd.DataFrame | pa.Table) -> None:
        """Write one Parquet object atomically.

        LZ4: on a 1.55M-row, 53-column features part it wrote as fast as zstd (0.96 s vs
        1.08 s) and read back 4× faster (0.19 s vs 0.77 s) for 16% more bytes; the
        pipeline reads every part it writes once more downstream.

        Dictionary encoding only for columns that are not floating point: scores and
        utilities are nearly all distinct, so the writer built a dictionary per page only
        to drop it. On a 1.55M-row scored_candidates part: 0.80 s instead of 1.38 s, 5%
        smaller.

        Min/max statistics only for columns that are neither floating point nor dictionary
        coded text: readers prune row groups by ids and times, never by a score or a coded
        label, and a coded column's statistics cost more than the rest of its writing (the
        same part: 0.15 s instead of 0.25 s).
        """
        table = (
            frame
            if isinstance(frame, pa.Table)
            else pa.Table.from_pandas(frame, preserve_index=False)
        )
        buffer = io.BytesIO()
        pq.write_table(
            table,
            buffer,
            compression="lz4",
            use_dictionary=[
                field.name for field in table.schema if not pa.types.is_floating(field.type)
            ],
            write_statistics=[
                field.name
                for field in table.schema
                if not (pa.types.is_floating(field.type) or pa.types.is_dictionary(field.type))
            ],
        )
        self.write_bytes(relative, buffer.getvalue())

    def read_parquet(
        self,
        relative: str,
        *,
        columns: list[str] | None = None,
        filter: Any = None,
    ) -> pd.DataFrame:
        """Read one Parquet file or a folder of them (all parts, sorted by name)."""
        return self.read_arrow(relative, columns=columns, filter=filter).to_pandas()

    def read_arrow(
        self,
        relative: str,
        *,
        columns: list[str] | None = None,
        filter: Any = None,
    ) -> pa.Table:
        return self.dataset(relative).to_table(columns=columns, filter=filter)

    def dataset(self, relative: str) -> ds.Dataset:
        """A lazy Parquet dataset over one file or a folder of parts: scans read only the
        columns and rows they ask for."""
        parts = self.parquet_parts(relative)
        if not parts:
            raise FileNotFoundError(f"not in the warehouse: {self.uri(relative)}")
        return ds.dataset([self.path(part) for part in parts], format="parquet", filesystem=self.fs)

    def parquet_parts(self, relative: str) -> list[str]:
        """Warehouse-relative paths of a Parquet dataset's parts (or the file itself)."""
        target = self.path(relative)
        if self.fs.isdir(target):
            return self.list(relative, suffix=".parquet")
        return [relative] if self.fs.exists(target) else []

    def replace_folder(self, relative: str, parts: dict[str, pd.DataFrame | pa.Table]) -> None:
        """Write a folder of Parquet parts, then remove parts of an earlier write not rewritten.

        Used for idempotent per-partition outputs: re-running a partition replaces it.
        """
        for name, frame in parts.items():
            self.write_parquet(f"{relative}/{name}", frame)
        for stale in set(self.list(relative, suffix=".parquet")) - {
            f"{relative.strip('/')}/{name}" for name in parts
        }:
            self.delete(stale)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode("utf-8")
