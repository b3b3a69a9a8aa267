"""Warm start: fetch listed URLs at start, and fill L1 from L2's most requested keys, so a
new instance does not begin with a cold cache (and a burst of upstream calls)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from proxy.confnode import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WarmConfig:
    """`warm:` in the config."""

    urls: tuple[str, ...] = ()  # path?query, as clients send them; fetched through the routes
    concurrency: int = 4  # at most this many warm fetches at once
    hottest: int = 0  # fill L1 from this many of L2's most requested keys (layered only)

    @staticmethod
    def parse(node: Node) -> WarmConfig:
        """The `warm:` section; every URL must be an origin-form path."""
        node.mapping(("urls", "concurrency", "hottest"))
        urls_node = node.child("urls")
        urls = urls_node.strings()
        for i, url in enumerate(urls):
            if not url.startswith("/"):
                raise urls_node.child(i).error(f"expected a path such as /briefings, got {url!r}")
        return WarmConfig(
            urls=urls,
            concurrency=node.child("concurrency").integer(4, minimum=1),
            hottest=node.child("hottest").integer(0),
        )


async def bounded(
    items: Iterable[str], concurrency: int, work: Callable[[str], Awaitable[bool]]
) -> int:
    """Run `work` over items, `concurrency` at a time; how many returned True. A failure of
    one item is logged and does not stop the others."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(item: str) -> bool:
        async with semaphore:
            try:
                return await work(item)
            except Exception:  # warming is best effort: a bad URL must not stop the rest
                log.exception("warming %s failed", item)
                return False

    results = await asyncio.gather(*(one(item) for item in items))
    return sum(results)
