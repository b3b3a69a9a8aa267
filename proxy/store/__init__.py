"""Cache stores: one narrow protocol, implemented by memory (and later Redis, layered)."""

from proxy.store.base import Store, StoreStats
from proxy.store.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "StoreStats"]
