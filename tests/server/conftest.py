"""Fixtures of every tests/server module: the real redis-server processes of ``tests/redis_support``."""

from tests.redis_support import redis_cluster, redis_factory, redis_server

__all__ = ["redis_cluster", "redis_factory", "redis_server"]
