"""Cache stores: the tier protocols (base.py), memory and Redis tiers, the breaker around a
remote one (guarded.py), and the layered store over them."""

from proxy.store.base import PagedStore, Shared, Store, StoreStats
from proxy.store.memory import MemoryStore

__all__ = ["MemoryStore", "PagedStore", "Shared", "Store", "StoreStats"]
