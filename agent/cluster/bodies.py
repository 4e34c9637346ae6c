"""Whole HTTP bodies, bounded: the one way the cluster code reads an aiohttp answer.

``StreamReader.read(n)`` returns what happens to be buffered (often one
network chunk), not ``n`` bytes; a body read that way is silently cut. Here
the body is read to its end, counting bytes against the limit as they come.
"""

from __future__ import annotations

import aiohttp


class BodyTooLarge(Exception):
    """The body is (or announces itself as) larger than the limit."""


async def read_whole(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of ``resp``, at most ``limit`` bytes.

    BodyTooLarge past the limit (announced or counted); aiohttp's
    ClientPayloadError when the body ends before its Content-Length.
    """
    if (resp.content_length or 0) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
