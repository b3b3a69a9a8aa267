"""Market calendars: when a market trades, and when it next opens (pure; time passed in)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.confnode import Node

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LOOKAHEAD_DAYS = 31  # a calendar with no session in a month has no next open


@dataclass(frozen=True, slots=True)
class Market:
    """One exchange's regular session in its own time zone (DST handled by zoneinfo)."""

    name: str
    zone: ZoneInfo
    opens: time
    closes: time
    weekdays: frozenset[int]  # 0 = Monday
    holidays: frozenset[date]
    settle: float = 30.0  # entries fetched while closed live this long past the next open

    def _trades_on(self, day: date) -> bool:
        return day.weekday() in self.weekdays and day not in self.holidays

    def is_open(self, when: float) -> bool:
        """Whether the regular session is running at epoch second `when`."""
        local = datetime.fromtimestamp(when, self.zone)
        return self._trades_on(local.date()) and self.opens <= local.time() < self.closes

    def next_open(self, when: float) -> float | None:
        """Epoch second of the first session open after `when` (None if none within a month)."""
        day = datetime.fromtimestamp(when, self.zone).date()
        for offset in range(_LOOKAHEAD_DAYS):
            candidate = day + timedelta(days=offset)
            if not self._trades_on(candidate):
                continue
            opening = datetime.combine(candidate, self.opens, self.zone).timestamp()
            if opening > when:
                return opening
        return None

    @staticmethod
    def parse(name: str, node: Node) -> Market:
        """A market from its config section (markets.<name>); errors name the field."""
        node.mapping(("timezone", "open", "close", "weekdays", "holidays", "settle"))
        zone_node = node.child("timezone")
        try:
            zone = ZoneInfo(zone_node.text())
        except (ZoneInfoNotFoundError, ValueError, OSError) as e:  # OSError: a name too long
            raise zone_node.error(f"unknown time zone {zone_node.value!r}") from e
        opens, closes = (_clock_time(node.child(f)) for f in ("open", "close"))
        if opens >= closes:
            raise node.child("close").error("must be later than open")
        days_node = node.child("weekdays")
        names = days_node.strings() if days_node.present() else WEEKDAYS[:5]
        for i, day in enumerate(names):
            if day.lower()[:3] not in WEEKDAYS:
                raise days_node.child(i).error(f"expected a weekday such as mon, got {day!r}")
        holidays_node = node.child("holidays")
        holidays = []
        for i, item in enumerate(holidays_node.sequence()):
            try:
                holidays.append(
                    item.value if isinstance(item.value, date) else date.fromisoformat(item.text())
                )
            except ValueError as e:
                raise holidays_node.child(i).error(
                    f"expected a date like 2026-12-25, got {item.value!r}"
                ) from e
        return Market(
            name=name,
            zone=zone,
            opens=opens,
            closes=closes,
            weekdays=frozenset(WEEKDAYS.index(d.lower()[:3]) for d in names),
            holidays=frozenset(holidays),
            settle=node.child("settle").duration(30.0),
        )

    def closed_lifetime(self, when: float, cap: float) -> float | None:
        """How long something fetched at `when` stays valid because the market is closed:
        until shortly after the next open, at most `cap`. None while the market is open."""
        if self.is_open(when):
            return None
        opening = self.next_open(when)
        if opening is None:
            return cap
        return min(opening - when + self.settle, cap)


def _clock_time(node: Node) -> time:
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 09:30 as 570
        if not 0 <= value < 24 * 60:
            raise node.error(f"expected a time like 09:30, got {value!r}")
        return time(value // 60, value % 60)
    try:
        return time.fromisoformat(node.text())
    except ValueError as e:
        raise node.error(f"expected a time like 09:30, got {value!r}") from e
