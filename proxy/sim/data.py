"""Deterministic Yahoo-shaped bodies: symbol universe, chart and quoteSummary."""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import struct
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

BUCKET_S = 60
SESSION_MIN = 390  # 9:30-16:00 New York and 9:00-15:30 Seoul are both 6.5 h
_PREPOST_MIN = 960  # 4:00-20:00 New York
_FIRST_TRADE = date(1985, 1, 2)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_VALID_RANGES = ("1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max")
_RANGE_DAYS = {"1d": 1, "5d": 5, "1mo": 21, "3mo": 63, "6mo": 126, "1y": 252, "2y": 504,
               "5y": 1260, "10y": 2520}  # fmt: skip
_INTRADAY_MIN = {"1m": 1, "2m": 2, "5m": 5, "15m": 15, "30m": 30, "60m": 60, "90m": 90, "1h": 60}
_DAILY = ("1d", "5d", "1wk", "1mo", "3mo")
_VALID_INTERVALS = (*_INTRADAY_MIN, *_DAILY)

# symbol: (long name, exchange, full exchange name, currency, typical price)
REAL_TICKERS: dict[str, tuple[str, str, str, str, float]] = {
    "AAPL": ("Apple Inc.", "NMS", "NasdaqGS", "USD", 228.0),
    "MSFT": ("Microsoft Corporation", "NMS", "NasdaqGS", "USD", 415.0),
    "TSLA": ("Tesla, Inc.", "NMS", "NasdaqGS", "USD", 250.0),
    "NVDA": ("NVIDIA Corporation", "NMS", "NasdaqGS", "USD", 120.0),
    "GOOG": ("Alphabet Inc.", "NMS", "NasdaqGS", "USD", 165.0),
    "AMZN": ("Amazon.com, Inc.", "NMS", "NasdaqGS", "USD", 185.0),
    "META": ("Meta Platforms, Inc.", "NMS", "NasdaqGS", "USD", 520.0),
    "005930.KS": ("Samsung Electronics Co., Ltd.", "KSC", "KSE", "KRW", 56000.0),
}


class ChartParamError(ValueError):
    """A range/interval pair that Yahoo answers with 422."""


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    """Static facts about one symbol of the universe."""

    symbol: str
    long_name: str
    exchange: str
    full_exchange: str
    currency: str
    base_price: float

    @property
    def korean(self) -> bool:
        """True for Seoul-listed symbols (KST session, KRW, no pre/post)."""
        return self.currency == "KRW"

    @property
    def price_hint(self) -> int:
        """Decimal places Yahoo shows for this symbol."""
        return 0 if self.korean else 2

    @property
    def gmtoffset(self) -> int:
        """Exchange offset from UTC in seconds (DST ignored)."""
        return 32400 if self.korean else -18000

    @property
    def tz_short(self) -> str:
        """Exchange time zone abbreviation."""
        return "KST" if self.korean else "EST"

    @property
    def tz_name(self) -> str:
        """Exchange IANA time zone name."""
        return "Asia/Seoul" if self.korean else "America/New_York"

    @property
    def open_utc_s(self) -> int:
        """Regular session open, seconds after UTC midnight."""
        return 0 if self.korean else 52200


class Universe:
    """The symbols the simulator knows, kept sorted for prefix search."""

    def __init__(self, size: int) -> None:
        infos: dict[str, SymbolInfo] = {}
        for sym, (name, exch, full, cur, px) in REAL_TICKERS.items():
            infos[sym] = SymbolInfo(sym, name, exch, full, cur, px)
        for i in range(size):
            sym = f"SYM{i:04d}"
            r = seeded("universe", sym)
            exch, full = r.choice((("NMS", "NasdaqGS"), ("NYQ", "NYSE"), ("NGM", "NasdaqGM")))
            name = f"{r.choice(_NAME_A)} {r.choice(_NAME_B)} {i:04d} {r.choice(_NAME_C)}"
            infos[sym] = SymbolInfo(sym, name, exch, full, "USD", round(r.uniform(3, 600), 2))
        self._infos = infos
        self.symbols: tuple[str, ...] = tuple(sorted(infos))

    def __len__(self) -> int:
        return len(self.symbols)

    def get(self, symbol: str) -> SymbolInfo | None:
        """Info for a symbol (case-insensitive), or None when it is not listed."""
        return self._infos.get(symbol.upper())

    def prefixed(self, prefix: str, limit: int) -> list[SymbolInfo]:
        """Up to limit symbols starting with prefix, in symbol order."""
        prefix = prefix.upper()
        out: list[SymbolInfo] = []
        for sym in self.symbols[bisect.bisect_left(self.symbols, prefix) :]:
            if len(out) >= limit or not sym.startswith(prefix):
                break
            out.append(self._infos[sym])
        return out


_NAME_A = ("Atlas", "Blue", "Cobalt", "Delta", "Evergreen", "Frontier", "Granite", "Harbor")
_NAME_B = ("Systems", "Holdings", "Energy", "Therapeutics", "Semiconductor", "Financial")
_NAME_C = ("Inc.", "Corp.", "Ltd.", "plc", "Group")


def seeded(*parts: object) -> random.Random:
    """A Random seeded from a stable hash of parts, so bodies repeat across processes."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def dumps(obj: Any) -> bytes:
    """Compact JSON the way Yahoo sends it."""
    return json.dumps(obj, separators=(",", ":")).encode()


def f32(x: float) -> float:
    """Round-trip through float32: Yahoo prices look like 189.8699951171875."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def last_price(info: SymbolInfo, bucket: int) -> float:
    """The symbol's price in this bucket; chart and quote agree on it."""
    r = seeded("px", info.symbol, bucket)
    phase = seeded("phase", info.symbol).uniform(0, 2 * math.pi)
    return info.base_price * (1 + 0.08 * math.sin(bucket / 604800 + phase)) * r.gauss(1, 0.002)


def chart_error(code: str, description: str) -> bytes:
    """Yahoo's chart error body."""
    return dumps({"chart": {"result": None, "error": {"code": code, "description": description}}})


def _trading_days(end: date, count: int | None, since: date | None) -> list[date]:
    days: list[date] = []
    d = end
    while (count is None or len(days) < count) and (since is None or d >= since):
        if d.weekday() < 5:
            days.append(d)
        d -= timedelta(days=1)
    days.reverse()
    return days


def _epoch(d: date) -> int:
    return (d.toordinal() - _EPOCH_ORDINAL) * 86400


def _timestamps(
    info: SymbolInfo, range_: str, interval: str, end: date, pre_post: bool
) -> tuple[list[int], list[date]]:
    if range_ not in _VALID_RANGES:
        raise ChartParamError(
            f"Invalid input - range={range_} is not supported. "
            f"Valid ranges: [{', '.join(_VALID_RANGES)}]"
        )
    if interval not in _VALID_INTERVALS:
        raise ChartParamError(
            f"Invalid input - interval={interval} is not supported. "
            f"Valid intervals: [{', '.join(_VALID_INTERVALS)}]"
        )
    if range_ == "ytd":
        days = _trading_days(end, None, date(end.year, 1, 1)) or _trading_days(end, 1, None)
    elif range_ == "max":
        days = _trading_days(end, None, _FIRST_TRADE)
    else:
        days = _trading_days(end, _RANGE_DAYS[range_], None)
    if interval in _INTRADAY_MIN:
        step = _INTRADAY_MIN[interval]
        # Yahoo keeps only 7 days of 1m bars and 60 days of other intraday bars
        if len(days) > (5 if step == 1 else 21):
            raise ChartParamError(
                f"{interval} data not available for range={range_}. "
                "The requested range must be within the last 60 days."
            )
        extended = pre_post and not info.korean
        start = info.open_utc_s - (19800 if extended else 0)
        minutes = _PREPOST_MIN if extended else SESSION_MIN
        bars = range(-(-minutes // step))
        return [_epoch(d) + start + k * step * 60 for d in days for k in bars], days
    opening = [_epoch(d) + info.open_utc_s for d in days]
    if interval == "1d":
        return opening, days
    if interval == "5d":
        return opening[::5], days
    group: dict[tuple[int, int], int] = {}
    for d, ts in zip(days, opening, strict=True):
        if interval == "1wk":
            key = d.isocalendar()[:2]
        else:
            key = (d.year, d.month if interval == "1mo" else (d.month - 1) // 3)
        group.setdefault(key, ts)
    return list(group.values()), days


def _period(info: SymbolInfo, start: int, end: int) -> dict[str, Any]:
    return {"timezone": info.tz_short, "end": end, "start": start, "gmtoffset": info.gmtoffset}


def chart_body(
    info: SymbolInfo, range_: str, interval: str, bucket: int, pre_post: bool = False
) -> bytes:
    """The /v8/finance/chart body; ChartParamError for pairs Yahoo rejects."""
    end = datetime.fromtimestamp(bucket, UTC).date()
    stamps, days = _timestamps(info, range_, interval, end, pre_post)
    r = seeded("chart", info.symbol, range_, interval, pre_post, bucket)
    hint = info.price_hint
    bar_min = (
        _INTRADAY_MIN.get(interval)
        or {"1d": 390, "5d": 1950, "1wk": 1950, "1mo": 8190, "3mo": 24570}[interval]
    )
    vol = 0.02 * math.sqrt(bar_min / SESSION_MIN)
    volume_per_bar = seeded("vol", info.symbol).uniform(5e6, 8e7) * bar_min / SESSION_MIN
    close = last_price(info, bucket)
    closes: list[float] = []
    for _ in stamps:
        closes.append(close)
        close = max(close / (1 + r.gauss(0, vol)), info.base_price * 0.01)
    closes.reverse()
    o: list[float] = []
    h: list[float] = []
    lo: list[float] = []
    c: list[float] = []
    v: list[int] = []
    prev = closes[0] if closes else 0.0
    for cl in closes:
        op = prev * (1 + r.gauss(0, vol * 0.3))
        o.append(f32(round(op, hint)))
        h.append(f32(round(max(op, cl) * (1 + abs(r.gauss(0, vol * 0.5))), hint)))
        lo.append(f32(round(min(op, cl) * (1 - abs(r.gauss(0, vol * 0.5))), hint)))
        c.append(f32(round(cl, hint)))
        v.append(int(volume_per_bar * r.lognormvariate(0, 0.6)))
        prev = cl
    day0 = _epoch(end)
    regular = _period(info, day0 + info.open_utc_s, day0 + info.open_utc_s + SESSION_MIN * 60)
    meta: dict[str, Any] = {
        "currency": info.currency,
        "symbol": info.symbol,
        "exchangeName": info.exchange,
        "fullExchangeName": info.full_exchange,
        "instrumentType": "EQUITY",
        "firstTradeDate": _epoch(_FIRST_TRADE) + info.open_utc_s,
        "regularMarketTime": bucket,
        "hasPrePostMarketData": not info.korean,
        "gmtoffset": info.gmtoffset,
        "timezone": info.tz_short,
        "exchangeTimezoneName": info.tz_name,
        "regularMarketPrice": c[-1] if c else None,
        "fiftyTwoWeekHigh": f32(round(max(h, default=0.0) * 1.07, hint)),
        "fiftyTwoWeekLow": f32(round(min(lo, default=0.0) * 0.91, hint)),
        "regularMarketDayHigh": h[-1] if h else None,
        "regularMarketDayLow": lo[-1] if lo else None,
        "regularMarketVolume": sum(v[-SESSION_MIN:]),
        "longName": info.long_name,
        "shortName": info.long_name,
        "chartPreviousClose": c[0] if c else None,
        "priceHint": hint,
        "currentTradingPeriod": {
            "pre": _period(info, regular["start"] - 19800, regular["start"]),
            "regular": regular,
            "post": _period(info, regular["end"], regular["end"] + 14400),
        },
        "dataGranularity": interval,
        "range": range_,
        "validRanges": list(_VALID_RANGES),
        "generated_at": bucket,
    }
    if interval in _INTRADAY_MIN:
        opens = [_epoch(d) + info.open_utc_s for d in days]
        meta["tradingPeriods"] = [[_period(info, t, t + SESSION_MIN * 60)] for t in opens]
    quote = {"open": o, "high": h, "low": lo, "close": c, "volume": v}
    indicators: dict[str, Any] = {"quote": [quote]}
    if interval in _DAILY:
        indicators["adjclose"] = [{"adjclose": c}]
    result = {"meta": meta, "timestamp": stamps, "indicators": indicators}
    return dumps({"chart": {"result": [result], "error": None}})


def _fmt(value: float, kind: str) -> dict[str, Any]:
    if kind == "pct":
        return {"raw": round(value, 6), "fmt": f"{value * 100:.2f}%"}
    if kind in ("big", "vol"):
        for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= div:
                short = f"{value / div:.2f}{suffix}"
                break
        else:
            short = f"{value:.0f}"
        return {"raw": int(value), "fmt": short, "longFmt": f"{int(value):,}"}
    if kind == "date":
        day = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d")
        return {"raw": int(value), "fmt": day}
    return {"raw": f32(round(value, 2)), "fmt": f"{value:,.2f}"}


# module: (field, kind, scale); "px" scales the live price, other kinds are absolute values
_MODULES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "price": (("regularMarketPrice", "px", 1.0), ("regularMarketChange", "px", 0.01),
              ("regularMarketChangePercent", "pct", 0.01), ("regularMarketOpen", "px", 0.995),
              ("regularMarketDayHigh", "px", 1.012), ("regularMarketDayLow", "px", 0.985),
              ("regularMarketPreviousClose", "px", 0.99), ("regularMarketVolume", "vol", 5e7),
              ("preMarketPrice", "px", 0.997), ("preMarketChange", "px", -0.003),
              ("preMarketChangePercent", "pct", -0.003), ("postMarketPrice", "px", 1.002),
              ("postMarketChange", "px", 0.002), ("postMarketChangePercent", "pct", 0.002),
              ("averageDailyVolume10Day", "vol", 4.8e7), ("marketCap", "big", 2e12)),
    "summaryDetail": (("previousClose", "px", 0.99), ("open", "px", 0.995),
                      ("dayLow", "px", 0.985), ("dayHigh", "px", 1.012),
                      ("dividendRate", "px", 0.004), ("dividendYield", "pct", 0.004),
                      ("payoutRatio", "pct", 0.15), ("beta", "num", 1.2),
                      ("trailingPE", "num", 30.0), ("forwardPE", "num", 26.0),
                      ("volume", "vol", 5e7), ("averageVolume", "vol", 5.5e7),
                      ("bid", "px", 0.999), ("ask", "px", 1.001), ("marketCap", "big", 2e12),
                      ("fiftyTwoWeekLow", "px", 0.75), ("fiftyTwoWeekHigh", "px", 1.15),
                      ("fiftyDayAverage", "px", 0.97), ("twoHundredDayAverage", "px", 0.93)),
    "defaultKeyStatistics": (("enterpriseValue", "big", 2.1e12), ("forwardPE", "num", 26.0),
                             ("profitMargins", "pct", 0.24), ("floatShares", "big", 1.5e10),
                             ("sharesOutstanding", "big", 1.5e10),
                             ("heldPercentInsiders", "pct", 0.02),
                             ("beta", "num", 1.2), ("bookValue", "px", 0.02),
                             ("priceToBook", "num", 45.0), ("lastFiscalYearEnd", "date", 1.727e9),
                             ("trailingEps", "px", 0.03), ("forwardEps", "px", 0.035)),
    "financialData": (("currentPrice", "px", 1.0), ("targetHighPrice", "px", 1.3),
                      ("targetLowPrice", "px", 0.8), ("targetMeanPrice", "px", 1.1),
                      ("totalCash", "big", 6.5e10), ("totalDebt", "big", 1.1e11),
                      ("totalRevenue", "big", 3.9e11), ("grossMargins", "pct", 0.46),
                      ("operatingMargins", "pct", 0.31), ("returnOnEquity", "pct", 1.6),
                      ("freeCashflow", "big", 1.1e11), ("revenueGrowth", "pct", 0.06)),
}  # fmt: skip
QUOTE_MODULES = (*_MODULES, "quoteType")


def quote_summary_error(code: str, description: str) -> bytes:
    """Yahoo's quoteSummary error body."""
    error = {"code": code, "description": description}
    return dumps({"quoteSummary": {"result": None, "error": error}})


def quote_summary_body(info: SymbolInfo, modules: tuple[str, ...], bucket: int) -> bytes:
    """The /v10/finance/quoteSummary body for known module names."""
    r = seeded("quoteSummary", info.symbol, ",".join(modules), bucket)
    px = last_price(info, bucket)
    fx = {"currency": info.currency, "exchange": info.exchange, "symbol": info.symbol}
    result: dict[str, Any] = {}
    for name in modules:
        if name == "quoteType":
            result[name] = {
                **fx,
                "quoteType": "EQUITY",
                "shortName": info.long_name,
                "longName": info.long_name,
                "timeZoneFullName": info.tz_name,
                "timeZoneShortName": info.tz_short,
                "gmtOffSetMilliseconds": info.gmtoffset * 1000,
                "maxAge": 1,
            }
            continue
        mod: dict[str, Any] = {"maxAge": 1}
        for field, kind, scale in _MODULES[name]:
            if kind == "px" and field != "regularMarketPrice" and field != "currentPrice":
                value = px * scale * r.uniform(0.98, 1.02)
            elif kind == "px":
                value = px
            else:
                value = scale * r.uniform(0.9, 1.1)
            mod[field] = _fmt(value, kind)
        if name == "price":
            mod.update(
                fx,
                shortName=info.long_name,
                longName=info.long_name,
                exchangeName=info.full_exchange,
                marketState="REGULAR",
                quoteType="EQUITY",
                regularMarketTime=bucket,
            )
        result[name] = mod
    return dumps({"quoteSummary": {"result": [result], "error": None}, "generated_at": bucket})
