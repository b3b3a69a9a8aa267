"""proxy/outcome.py: each outcome's metrics label and Cache-Status (RFC 9211), spelled once."""

from __future__ import annotations

import pytest

from proxy import outcome as said
from proxy.outcome import OUTCOMES, Outcome


@pytest.mark.parametrize(
    ("outcome", "label", "cache_status"),
    [
        (said.hit("l1", 299.9), "hit_l1", "cacheproxy; hit; ttl=299; detail=l1"),
        (said.hit("l2", 3), "hit_l2", "cacheproxy; hit; ttl=3; detail=l2"),
        (said.STALE, "stale", "cacheproxy; hit; fwd=stale; detail=stale-while-revalidate"),
        (
            said.stale_if_error(503),
            "stale_error",
            "cacheproxy; hit; fwd=stale; fwd-status=503; detail=stale-if-error",
        ),
        (said.COLLAPSED, "coalesced", "cacheproxy; fwd=miss; collapsed"),
        (said.COLLAPSED_L2, "coalesced", "cacheproxy; fwd=miss; collapsed; detail=l2"),
        (said.fetched(True), "miss", "cacheproxy; fwd=miss; stored"),
        (said.fetched(False, "no-store"), "miss", "cacheproxy; fwd=miss; detail=no-store"),
        (
            said.fetched(True, revalidated=True),
            "miss",
            "cacheproxy; fwd=stale; fwd-status=304; stored",
        ),
        (
            said.fetched(False, "no-cache", revalidated=True),
            "miss",
            "cacheproxy; fwd=stale; fwd-status=304; detail=no-cache",
        ),
        (said.TOO_LARGE, "miss", "cacheproxy; fwd=miss; detail=too-large"),
        (
            said.failed(504, "timeout"),
            "error",
            "cacheproxy; fwd=miss; fwd-status=504; detail=upstream-timeout",
        ),
        (said.passed("method"), "bypass", "cacheproxy; fwd=method; detail=method"),
        (said.passed("credentials"), "bypass", "cacheproxy; fwd=bypass; detail=credentials"),
    ],
)
def test_each_outcome_says_its_label_and_cache_status(
    outcome: Outcome, label: str, cache_status: str
) -> None:
    assert outcome.label == label
    assert outcome.cache_status == cache_status
    assert label in OUTCOMES  # every label is one /stats and the metrics know


def test_hits_are_memoised_and_equal_by_value() -> None:
    assert said.hit("l1", 10.2) is said.hit("l1", 10.9)  # the hit path allocates nothing
    assert said.hit("l1", 10.2) == Outcome("hit", "l1", 10, detail="l1")
    assert said.hit("l1", 10) != said.hit("l2", 10)


def test_served_from_cache_is_what_counts_residence_time() -> None:
    assert {o.label for o in (said.hit("l1", 1), said.STALE, said.stale_if_error(500))} == {
        "hit_l1", "stale", "stale_error",
    }  # fmt: skip
    assert all(o.from_cache for o in (said.hit("l1", 1), said.STALE, said.stale_if_error(500)))
    assert not any(o.from_cache for o in (said.COLLAPSED, said.fetched(True), said.TOO_LARGE))
