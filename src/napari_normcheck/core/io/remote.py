"""Volumes by URL: ``http(s)://``, ``s3://`` and any other fsspec protocol, read lazily through zarr.

:func:`open_remote` wraps zarr's ``FsspecStore`` in a :class:`RetryingCache`: only the chunks a
tile needs are fetched, each at most once while it stays in a bounded in-memory cache (overlapping
tiles read the same chunks), and a transient failure (a 5xx answer, a refused or reset connection,
a timeout) is retried with exponential back-off before it fails the run. Writing remote stores is
out of scope: OUT stays on a filesystem.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from typing import Any

import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

from napari_normcheck.core.base.errors import NormcheckError, first_line

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Stored chunks kept in memory (compressed, as fetched): enough for the chunks a row of tiles reads.
DEFAULT_CACHE_BYTES = 256 * 2**20
DEFAULT_RETRIES = 6  # back-off 0.25, 0.5, 1, 2, 4, 8 s: about 16 s for a server to come back


def is_url(source: Any) -> bool:
    """Whether ``source`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(source, str) and bool(_URL.match(source))


def is_transient(error: BaseException) -> bool:
    """Whether a failed fetch is worth retrying: a server error, a dropped or refused connection."""
    status = getattr(error, "status", None)  # aiohttp.ClientResponseError and the like
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(error, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    # aiohttp's connection errors (refused, reset, server gone) without importing aiohttp here.
    return bool(names & {"ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError"})


class RetryingCache(WrapperStore[Store]):
    """A read-only store wrapper: LRU cache of fetched values, retries of transient failures.

    Parameters
    ----------
    store : zarr.abc.store.Store
        The remote store (an ``FsspecStore``).
    max_bytes : int
        Bytes of fetched values kept in memory (least recently used dropped first).
    retries : int
        Attempts after the first on a transient failure, with back-off ``backoff * 2**k`` seconds.
    backoff : float
        First back-off in seconds.
    """

    def __init__(
        self,
        store: Store,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.25,
    ) -> None:
        super().__init__(store)
        self.max_bytes = max_bytes
        self.retries = retries
        self.backoff = backoff
        self.n_fetched = 0
        self.n_retried = 0
        self._cache: OrderedDict[str, Buffer | None] = OrderedDict()
        self._cached_bytes = 0

    def _with_store(self, store: Store) -> RetryingCache:
        return type(self)(store, self.max_bytes, self.retries, self.backoff)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        """The value at ``key``: from the cache, else fetched (with retries) and cached."""
        if byte_range is not None:  # partial reads (shards) are fetched as asked, not cached
            return await self._fetch(key, prototype, byte_range)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = await self._fetch(key, prototype, None)
        size = 0 if value is None else len(value)
        if size <= self.max_bytes:
            self._cache[key] = value
            self._cached_bytes += size
            while self._cached_bytes > self.max_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= 0 if dropped is None else len(dropped)
        return value

    async def _fetch(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        for attempt in range(self.retries + 1):
            try:
                value = await self._store.get(key, prototype, byte_range)
                self.n_fetched += 1
                return value
            except Exception as error:
                if attempt == self.retries or not is_transient(error):
                    raise
                self.n_retried += 1
                await asyncio.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """``--storage-options``: a JSON object of fsspec options (``{"anon": true}``, an endpoint).

    Raises
    ------
    NormcheckError
        When ``text`` is not a JSON object.
    """
    if not text:
        return None
    try:
        options = json.loads(text)
    except ValueError as error:
        raise NormcheckError(
            f"--storage-options is not valid JSON ({error}); give an object such as "
            '\'{"anon": true}\' or \'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\''
        ) from None
    if not isinstance(options, dict):
        raise NormcheckError("--storage-options must be a JSON object ({...}) of fsspec options")
    return options


def open_remote(url: str, storage_options: dict[str, Any] | None = None) -> zarr.Array | zarr.Group:
    """Open the zarr array or group at ``url`` read-only, lazily, with retries and a cache.

    Raises
    ------
    NormcheckError
        When fsspec has no filesystem for the scheme (a missing extra such as ``s3fs``), or the
        URL cannot be reached or holds no zarr array or group.
    """
    try:
        store = FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=True)
    except (ImportError, ValueError) as error:
        raise NormcheckError(
            f"cannot open {url}: {first_line(error)}; reading this kind of URL needs its fsspec "
            "package (http(s): aiohttp; s3: s3fs)"
        ) from error
    cached = RetryingCache(store)
    cached.retries = 1  # at the door: a wrong address is said at once, not after 16 s
    try:
        node = zarr.open(store=cached, mode="r")
    except Exception as error:
        cause = first_line(error)
        raise NormcheckError(
            f"cannot read a zarr array or group at {url} ({cause}); check the address, the "
            "network and the credentials (--storage-options, the AWS environment)"
        ) from error
    finally:
        cached.retries = DEFAULT_RETRIES
    return node
