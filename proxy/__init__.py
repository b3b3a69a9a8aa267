"""cacheproxy: a caching reverse proxy for market-data APIs."""

__version__ = "0.1.0"
