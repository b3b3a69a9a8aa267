"""`Shared` for an instance alone (no Redis): nobody else takes leases, hears messages or
reads records, so every lease is granted and the rest goes nowhere. The layered store still
keeps bans and request counts in this process."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from proxy.quota import Answer, QuotaAsk, QuotaReport


class Solo:
    """The no-op `Shared`: leases always granted, nothing kept, nothing sent."""

    @property
    def reaches_others(self) -> bool:
        """Never: there are no others."""
        return False

    async def acquire_lease(self, key: str, owner: str, seconds: float) -> bool:
        """Granted: no other instance could fetch key meanwhile."""
        return True

    async def lease_held(self, key: str) -> bool:
        """Never held by anyone else."""
        return False

    async def release_lease(self, key: str, owner: str) -> None:
        """Nothing to give back."""

    async def save_bans(self, records: Mapping[str, bytes], forget: Sequence[str]) -> None:
        """Nowhere to keep them: they live in this process's `Bans` only."""

    async def load_bans(self) -> dict[bytes, bytes]:
        """None on record."""
        return {}

    async def add_popularity(self, counts: Mapping[str, int]) -> None:
        """Nowhere to add them: the layered store keeps its counts itself."""

    async def hottest(self, n: int) -> list[tuple[str, float]]:
        """No shared counts."""
        return []

    async def publish(self, channel: str, message: bytes) -> None:
        """Nobody listens."""

    async def reserve_quota(self, upstream: str, ask: QuotaAsk) -> Answer | None:
        """Not counted here: this instance alone spends the quota, and counts it itself."""
        return None

    async def pause_quota(self, upstream: str, seconds: float, now: float | None) -> None:
        """Nobody else to pause: the guard pauses this instance."""

    async def learn_quota(self, upstream: str, report: QuotaReport) -> None:
        """Nobody else counts: the guard raises this instance's own count."""
