"""``http(s)://URL``: a polled or long-polled table endpoint.

Plain servers (nginx serving the file, an object store) are polled every
``poll_interval`` with ``If-None-Match``. A server that answers with the header
``X-Keyroute-Long-Poll: 1`` (``keyroute serve-table`` does) is long-polled:
``GET URL?after=<generation>&wait=<seconds>`` returns the table as soon as it is
newer than ``after``, or 304 when ``wait`` runs out, so a change arrives at once
without hammering the server. A long poll answered with nothing newer (a 304,
the same body, an older table) is not repeated until ``poll_interval`` after it
was sent: a cache in front of the server may answer at once, every time.
Errors back off exponentially with jitter; the table in force stays.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from email.utils import parsedate_to_datetime

import aiohttp

from ..assignment import Assignment, AssignmentError
from ..offload import Offload
from . import Failure

LONG_POLL_HEADER = "X-Keyroute-Long-Poll"
MAX_TABLE_BYTES = 256 << 20


async def read_body(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None if it is larger than ``limit``. (``read(n)``
    returns what is buffered, often a first piece only.)"""
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)


def reusable_etag(headers: Mapping[str, str]) -> str | None:
    """The response's ETag, unless it may not change with the content: a file
    modified in the second it was served (``Last-Modified`` not before ``Date``)
    can change again within that second, and servers that derive the ETag from
    mtime in seconds and size (nginx) would keep it. RFC 9110, 8.8.2.2."""
    etag = headers.get("ETag")
    modified, date = headers.get("Last-Modified"), headers.get("Date")
    if etag and modified and date:
        try:
            if parsedate_to_datetime(modified) >= parsedate_to_datetime(date):
                return None
        except (TypeError, ValueError):
            pass
    return etag


class HttpSource:
    def __init__(
        self,
        url: str,
        *,
        poll_interval: float = 1.0,
        authorization: str = "",
        timeout: float = 10.0,
        wait: float = 30.0,
        backoff_base: float = 0.25,
        backoff_cap: float = 30.0,
        offload: Offload | None = None,
    ) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self.authorization = authorization
        self.timeout = timeout
        self.wait = wait
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.etag: str | None = None
        self.body: bytes | None = None  # last body fetched: the same again is no news
        self.generation: int | None = None
        self.long_poll = False
        self._own_offload = offload is None
        self.offload = offload if offload is not None else Offload()

    @property
    def name(self) -> str:
        return self.url

    def _backoff(self, failures: int) -> float:
        # "Full jitter": uniform in [0, min(cap, base * 2**n)].
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * (2**failures)))

    async def updates(self) -> AsyncIterator[Assignment | Failure]:
        try:
            async for item in self._updates():
                yield item
        finally:
            if self._own_offload:
                self.offload.close()
                # A fresh (not yet started) one, should updates() be called
                # again: ``reload.follow`` restarts a source that failed.
                self.offload = Offload()

    async def _updates(self) -> AsyncIterator[Assignment | Failure]:
        loop = asyncio.get_running_loop()
        failures = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            while True:
                headers = {}
                if self.etag:
                    headers["If-None-Match"] = self.etag
                if self.authorization:
                    headers["Authorization"] = self.authorization
                params = {}
                if self.long_poll and self.generation is not None:
                    params = {"after": str(self.generation), "wait": f"{self.wait:g}"}
                budget = self.timeout + (self.wait if params else 0)
                result: Assignment | Failure | None = None
                sent = loop.time()
                try:
                    async with session.get(
                        self.url, params=params, headers=headers, timeout=aiohttp.ClientTimeout(total=budget)
                    ) as r:
                        self.long_poll = r.headers.get(LONG_POLL_HEADER) == "1"
                        if r.status == 304:
                            failures = 0
                        elif r.status == 200:
                            data = await read_body(r.content, MAX_TABLE_BYTES)
                            if data is None:
                                result = Failure("invalid", f"{self.url}: table larger than {MAX_TABLE_BYTES} bytes")
                            elif data == self.body:
                                self.etag = reusable_etag(r.headers)
                                failures = 0
                            else:
                                try:
                                    table = await self.offload.parse(data)
                                except AssignmentError as exc:
                                    # Not asked again until it changes (plain servers honour the ETag).
                                    self.body = data
                                    self.etag = reusable_etag(r.headers)
                                    result = Failure("invalid", f"{self.url}: {exc}")
                                else:
                                    # Remembered only once parsed: after any other
                                    # failure (the source is restarted) the same
                                    # body is news again.
                                    self.body = data
                                    self.etag = reusable_etag(r.headers)
                                    result = table
                                    failures = 0
                        else:
                            result = Failure("error", f"{self.url}: HTTP {r.status}")
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    result = Failure("error", f"{self.url}: {describe(exc)}")
                newer = isinstance(result, Assignment) and (
                    self.generation is None or result.generation > self.generation
                )
                if newer:
                    assert isinstance(result, Assignment)
                    # Never lowered: a stale table (from a cache, say) must not
                    # make the next long poll ask for what is already in force.
                    self.generation = result.generation
                if result is not None:
                    yield result
                if isinstance(result, Failure):
                    failures += 1
                    await asyncio.sleep(self._backoff(failures))
                elif not self.long_poll:
                    await asyncio.sleep(self.poll_interval)
                elif not newer:
                    # A long poll that brought nothing newer: a server parks it
                    # for ``wait``, but a cache in front of one answers at once.
                    # Keep to one request per ``poll_interval`` then.
                    await asyncio.sleep(max(0.0, self.poll_interval - (loop.time() - sent)))


def describe(exc: BaseException) -> str:
    """A fetch error in words an operator can act on (aiohttp's own text for a
    refused connection mentions ``ssl:default`` even for plain http://)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        reason = os_error.strerror or str(os_error) or os_error.__class__.__name__
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    return f"{exc.__class__.__name__}: {exc}"
