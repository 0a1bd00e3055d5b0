"""Object storage behind one Protocol: S3/MinIO (any S3 endpoint, through the ``minio`` client) and a local folder."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Data = bytes | bytearray | memoryview
Parts = Data | Sequence[Data]  # one buffer, or several written one after the other (no concatenation)


def as_parts(data: Parts) -> list[Data]:
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)


def parts_size(parts: list[Data]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


class _PartsReader(io.RawIOBase):
    """A read-only stream over several buffers, for the S3 client: no joined copy of a large object."""

    def __init__(self, parts: list[Data]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._i = 0
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = 0
        while n < len(out) and self._i < len(self._parts):
            part = self._parts[self._i]
            k = min(len(out) - n, len(part) - self._at)
            out[n : n + k] = part[self._at : self._at + k]
            n += k
            self._at += k
            if self._at == len(part):
                self._i, self._at = self._i + 1, 0
        return n


@dataclass
class Reader:
    """An object being read as a stream: its size, and ``readinto(buffer) -> bytes read`` (0 at the end)."""

    size: int
    readinto: Callable[[memoryview], int]


@contextmanager
def memory_reader(parts: list[Data]) -> Iterator[Reader]:
    """A ``Reader`` over buffers this process holds (an object it wrote and kept): read as a store's object is."""
    yield Reader(parts_size(parts), _PartsReader(parts).readinto)


class StoreError(Exception):
    """The object store failed or refused a request."""


class ObjectNotFound(StoreError):
    def __init__(self, key: str, where: str) -> None:
        super().__init__(f"object {key!r} not found in {where}")
        self.key = key


class StoreUnavailable(StoreError):
    """The store cannot be reached at all (connection refused, DNS, timeout)."""


@runtime_checkable
class ObjectStore(Protocol):
    """Flat key → bytes storage. Writes are atomic: a reader sees the whole object or none of it.

    ``put`` takes one buffer or a sequence of them (written in order, never joined in memory); ``get``
    returns a ``bytearray`` read straight into one allocation, so a blob's tensors can be views of it.
    ``durable=False`` marks an object the system can recompute if a power loss takes it (a shard's gradient
    blob: a missing or torn one is found by its digest and the shard recomputed); a store may then skip
    flushing it to disk. Everything else (checkpoints, manifests, records) is flushed before ``put`` returns."""

    def put(self, key: str, data: Parts, *, durable: bool = True) -> None: ...

    def get(self, key: str) -> bytearray: ...

    def reader(self, key: str) -> AbstractContextManager[Reader]:
        """The object as a stream (``with store.reader(key) as r: r.readinto(buf)``): a reader holds one
        piece in memory at a time, not the object."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def check(self) -> None:
        """Raise StoreUnavailable with a one-line reason when the store cannot be used."""
        ...

    def describe(self) -> str: ...


def _check_key(key: str) -> str:
    # Keys are relative, slash-separated, without traversal: a key must never escape its prefix.
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"invalid object key {key!r}: keys are relative paths without '.', '..' or empty parts")
    return key


class LocalStore:
    """A folder on disk. Atomic writes through a temporary file and ``os.replace``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: Parts, *, durable: bool = True) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for part in as_parts(data):
                    f.write(part)
                f.flush()
                if durable:  # an object that is not (a gradient blob) is recomputed if a power loss tears it
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytearray:
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                view, n = memoryview(buf), 0
                while n < size:
                    got = f.readinto(view[n:])
                    if not got:
                        raise StoreError(f"object {key!r} shrank while being read from {self.describe()}")
                    n += got
                return buf
        except FileNotFoundError:
            raise ObjectNotFound(key, self.describe()) from None

    @contextmanager
    def reader(self, key: str) -> Iterator[Reader]:
        try:
            f = open(self._path(key), "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ObjectNotFound(key, self.describe()) from None
        with f:
            yield Reader(os.fstat(f.fileno()).st_size, f.readinto)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[str]:
        # Walk only the folder the prefix names (not the whole store: it holds every job's checkpoints).
        folder = prefix.rpartition("/")[0]
        base = self._path(folder) if folder else self.root
        if not base.is_dir():
            return
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith(".tmp-"):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"local store {self.root} is not writable: {e.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable(f"local store {self.root} is not writable")

    def describe(self) -> str:
        return f"local folder {self.root}"


class S3Store:
    """Any S3 endpoint (MinIO in production) through the ``minio`` client. S3 PUTs are atomic per object."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        timeout_s: float = 10.0,
    ) -> None:
        import urllib3
        from minio import Minio

        self.endpoint = endpoint
        self.bucket = bucket
        # Short connect timeout and a few retries: an unreachable store should fail fast with a clear
        # message; the Celery task's own retry with backoff rides out longer outages.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=max(timeout_s, 60.0)),
            maxsize=16,
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self._client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http
        )
        self._bucket_ok = False

    def _wrap(self, e: Exception) -> StoreError:
        import urllib3

        if isinstance(e, (urllib3.exceptions.HTTPError, OSError)):
            return StoreUnavailable(f"S3 endpoint {self.endpoint} unreachable: {type(e).__name__}")
        return StoreError(f"S3 {self.endpoint}/{self.bucket}: {e}")

    def ensure_bucket(self) -> None:
        if self._bucket_ok:
            return
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
        except Exception as e:  # noqa: BLE001 - normalised into StoreError
            raise self._wrap(e) from None
        self._bucket_ok = True

    def put(self, key: str, data: Parts, *, durable: bool = True) -> None:
        # The server decides durability (MinIO writes through erasure sets): `durable` changes nothing here.
        self.ensure_bucket()
        parts = as_parts(data)
        try:
            self._client.put_object(self.bucket, _check_key(key), _PartsReader(parts), parts_size(parts))
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e) from None

    def get(self, key: str) -> bytearray:
        from minio.error import S3Error

        resp = None
        try:
            resp = self._client.get_object(self.bucket, _check_key(key))
            return _read_all(resp, key)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(key, self.describe()) from None
            raise self._wrap(e) from None
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e) from None
        finally:
            if resp is not None:
                resp.close()
                resp.release_conn()

    @contextmanager
    def reader(self, key: str) -> Iterator[Reader]:
        from minio.error import S3Error

        try:
            resp = self._client.get_object(self.bucket, _check_key(key))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket"):
                raise ObjectNotFound(key, self.describe()) from None
            raise self._wrap(e) from None
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e) from None
        try:
            yield Reader(int(resp.headers.get("Content-Length", 0)), self._guarded_readinto(resp))
        finally:
            resp.close()
            resp.release_conn()

    def _guarded_readinto(self, resp: Any) -> Callable[[memoryview], int]:
        def readinto(buf: memoryview) -> int:
            try:
                return int(resp.readinto(buf))
            except Exception as e:  # noqa: BLE001 - a connection lost mid-body
                raise self._wrap(e) from None

        return readinto

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self._client.stat_object(self.bucket, _check_key(key))
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            raise self._wrap(e) from None
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e) from None

    def delete(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, _check_key(key))
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e) from None

    def list(self, prefix: str) -> Iterator[str]:
        try:
            for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=True):
                yield obj.object_name
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e) from None

    def check(self) -> None:
        self._bucket_ok = False
        self.ensure_bucket()

    def describe(self) -> str:
        return f"S3 endpoint {self.endpoint} bucket {self.bucket}"


def _read_all(resp: Any, key: str) -> bytearray:
    """The body, read into one bytearray of the announced length (no list of chunks joined afterwards)."""
    length = resp.headers.get("Content-Length")
    if length is None:
        return bytearray(resp.read())
    buf = bytearray(int(length))
    view, n = memoryview(buf), 0
    while n < len(buf):
        got = resp.readinto(view[n:])
        if not got:
            raise StoreError(f"object {key!r}: the body ended after {n} of {len(buf)} bytes")
        n += got
    return buf


def open_store(settings: object | None = None) -> ObjectStore:
    """Build the store the settings name: S3 when ``s3_endpoint`` is set, else the local folder."""
    from pipeline.settings import Settings, get_settings

    s: Settings = settings if settings is not None else get_settings()  # type: ignore[assignment]
    if s.s3_endpoint:
        return S3Store(
            s.s3_endpoint,
            s.s3_access_key.get_secret_value(),
            s.s3_secret_key.get_secret_value(),
            s.s3_bucket,
            secure=s.s3_secure,
            region=s.s3_region,
        )
    return LocalStore(s.store_root)
