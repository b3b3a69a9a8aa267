"""Deterministic text-heavy bodies: news, search, trending and briefings."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import Any

from proxy.sim.data import SymbolInfo, Universe, dumps, seeded

BRIEFING_EVERY_S = 300
BRIEFINGS_LISTED = 60
TRENDING_REGIONS = ("US", "KR")

_PUBLISHERS = (
    "Reuters",
    "Bloomberg",
    "Barrons.com",
    "Motley Fool",
    "Yahoo Finance",
    "Investor's Business Daily",
    "MarketWatch",
    "Zacks",
    "Yonhap",
)
_VERBS = ("climb", "slide", "jump", "slip", "rally", "tumble", "edge higher", "edge lower")
_CATALYSTS = (
    "analysts raise price targets",
    "quarterly revenue tops estimates",
    "investors weigh the rate outlook",
    "supply chain concerns ease",
    "a new product launch draws attention",
    "regulators open a review",
    "guidance disappoints",
    "AI demand lifts the outlook",
    "a large holder trims its stake",
    "buyback plans are expanded",
)
_FILLER = (
    "Traders pointed to",
    "Market strategists noted",
    "According to filings,",
    "In early trading",
    "Options activity suggested",
    "Portfolio managers said",
    "Sell-side analysts highlighted",
    "Company executives emphasized",
)
_TOPICS = (
    "margin expansion in the core business",
    "softer demand from enterprise customers",
    "currency headwinds in overseas markets",
    "resilient consumer spending",
    "inventory normalization across the channel",
    "higher capital expenditure plans",
    "pricing power in premium segments",
    "a cautious tone on the next quarter",
    "momentum in the services segment",
    "shifting expectations for interest rates",
)


def _uuid(r: random.Random) -> str:
    return str(uuid.UUID(int=r.getrandbits(128), version=4))


def _sentence(r: random.Random) -> str:
    return f"{r.choice(_FILLER)} {r.choice(_TOPICS)} and {r.choice(_TOPICS)}."


def _paragraph(r: random.Random, chars: int) -> str:
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        parts.append(_sentence(r))
    return " ".join(parts)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _headline(r: random.Random, info: SymbolInfo) -> str:
    return f"{info.long_name} shares {r.choice(_VERBS)} as {r.choice(_CATALYSTS)}"


def news_items(info: SymbolInfo, count: int, bucket: int) -> list[dict[str, Any]]:
    """count news items about one symbol, newest first."""
    r = seeded("news", info.symbol, count, bucket)
    items: list[dict[str, Any]] = []
    published = bucket
    for _ in range(count):
        published -= r.randrange(300, 7200)
        title = _headline(r, info)
        slug = "-".join(title.lower().replace(",", "").replace(".", "").split()[:8])
        items.append(
            {
                "uuid": _uuid(r),
                "title": title,
                "publisher": r.choice(_PUBLISHERS),
                "link": f"https://finance.yahoo.com/news/{slug}-{r.randrange(10**8, 10**9)}.html",
                "providerPublishTime": published,
                "type": "STORY",
                "summary": _paragraph(r, 160),
                "relatedTickers": [info.symbol],
            }
        )
    return items


def news_body(info: SymbolInfo, bucket: int) -> bytes:
    """The /v2/finance/news body: ten items for one symbol."""
    stream = news_items(info, 10, bucket)
    return dumps(
        {
            "news": {
                "symbol": info.symbol,
                "count": len(stream),
                "stream": stream,
                "generated_at": bucket,
            }
        }
    )


def ncp_body(infos: list[SymbolInfo], count: int, bucket: int) -> bytes:
    """The POST /xhr/ncp body: up to count stories across the requested symbols, interleaved."""
    per = [news_items(info, count, bucket) for info in infos]
    merged = [item for group in zip(*per, strict=True) for item in group][:count]
    stream = [
        {
            "id": item["uuid"],
            "content": {
                "id": item["uuid"],
                "contentType": "STORY",
                "title": item["title"],
                "summary": item["summary"],
                "pubDate": _iso(item["providerPublishTime"]),
                "provider": {"displayName": item["publisher"]},
                "canonicalUrl": {"url": item["link"]},
                "finance": {"stockTickers": [{"symbol": s} for s in item["relatedTickers"]]},
            },
        }
        for item in merged
    ]
    return dumps(
        {
            "data": {"tickerStream": {"stream": stream, "pagination": {"uuids": ""}}},
            "status": "OK",
            "generated_at": bucket,
        }
    )


def finance_error(code: str, description: str) -> bytes:
    """Yahoo's error body for the /v1/finance endpoints."""
    error = {"code": code, "description": description}
    return dumps({"finance": {"result": None, "error": error}})


def trending_body(universe: Universe, region: str, count: int, bucket: int) -> bytes:
    """The /v1/finance/trending/{region} body; region must be one of TRENDING_REGIONS."""
    r = seeded("trending", region, count, bucket)
    local = [s for s in universe.symbols if s.endswith(".KS") == (region == "KR")]
    others = [s for s in universe.symbols if s.endswith(".KS") != (region == "KR")]
    # Korean lists lead with the few Seoul listings, then US names, as Yahoo KR does
    pool = r.sample(local, len(local)) + r.sample(others, len(others))
    picked = pool[: min(count, len(pool))]
    result = {
        "count": len(picked),
        "quotes": [{"symbol": s} for s in picked],
        "jobTimestamp": bucket * 1000,
        "startInterval": int(datetime.fromtimestamp(bucket, UTC).strftime("%Y%m%d%H%M")),
    }
    return dumps({"finance": {"result": [result], "error": None}, "generated_at": bucket})


def search_body(
    universe: Universe, q: str, quotes_count: int, news_count: int, bucket: int
) -> bytes:
    """The /v1/finance/search body: symbols starting with q plus news on the best match."""
    r = seeded("search", q.upper(), quotes_count, news_count, bucket)
    matches = universe.prefixed(q, quotes_count)
    quotes = [
        {
            "exchange": m.exchange,
            "shortname": m.long_name,
            "quoteType": "EQUITY",
            "symbol": m.symbol,
            "index": "quotes",
            "score": round(r.uniform(2e4, 2e6), 1),
            "typeDisp": "Equity",
            "longname": m.long_name,
            "exchDisp": m.full_exchange,
            "isYahooFinance": True,
        }
        for m in matches
    ]
    topic = matches[0] if matches else SymbolInfo("^GSPC", "S&P 500", "SNP", "SNP", "USD", 5000)
    news = [
        {k: v for k, v in item.items() if k != "summary"}
        for item in news_items(topic, news_count, bucket)
    ]
    return dumps(
        {
            "explains": [],
            "count": len(quotes) + len(news),
            "quotes": quotes,
            "news": news,
            "nav": [],
            "lists": [],
            "researchReports": [],
            "screenerFieldResults": [],
            "totalTime": r.randrange(20, 80),
            "timeTakenForQuotes": r.randrange(400, 500),
            "timeTakenForNews": r.randrange(500, 700),
            "generated_at": bucket,
        }
    )


def _briefing_head(universe: Universe, briefing_id: int) -> dict[str, Any]:
    r = seeded("briefing", briefing_id)
    syms = r.sample(universe.symbols, min(1, len(universe.symbols)))
    title = f"{syms[0] if syms else 'Markets'}: {r.choice(_CATALYSTS).capitalize()}"
    return {
        "id": str(briefing_id),
        "title": title,
        "symbols": syms,
        "published": briefing_id * BRIEFING_EVERY_S,
    }


def briefings_body(universe: Universe, bucket: int) -> bytes:
    """The /briefings body: the newest live briefings, one every five minutes."""
    newest = bucket // BRIEFING_EVERY_S
    items = [_briefing_head(universe, newest - k) for k in range(BRIEFINGS_LISTED)]
    return dumps({"briefings": items, "count": len(items), "generated_at": bucket})


def briefing_exists(briefing_id: str, bucket: int) -> bool:
    """Whether the id names a briefing published by this bucket."""
    return briefing_id.isdecimal() and 0 < int(briefing_id) <= bucket // BRIEFING_EVERY_S


def briefing_body(universe: Universe, briefing_id: str, bucket: int) -> bytes:
    """The /briefings/{id} article for an id that briefing_exists accepts."""
    head = _briefing_head(universe, int(briefing_id))
    r = seeded("briefing-body", briefing_id)
    sections = [
        {"heading": r.choice(_TOPICS).capitalize(), "body": _paragraph(r, 1200)} for _ in range(6)
    ]
    article = {
        **head,
        "author": f"{r.choice(_PUBLISHERS)} desk",
        "summary": _paragraph(r, 300),
        "sections": sections,
        "generated_at": bucket,
    }
    return dumps({"briefing": article})
