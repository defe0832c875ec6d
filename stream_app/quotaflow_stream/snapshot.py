"""Redis snapshot of the latest quota state per key, written in batches off the hot path.

The worker keeps publishing to Kafka when Redis is away: states wait here (latest per key, so
memory is bounded by the number of keys) and are written once Redis answers again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 1000


class SnapshotWriter:
    def __init__(self, client: Any, states_hash: str, policies_key: str | None = None) -> None:
        self._client = client  # a redis.asyncio.Redis
        self.states_hash = states_hash
        self.policies_key = policies_key
        self._pending: dict[str, bytes] = {}
        # the live policy version to copy to Redis at the next flush
        self._policies: bytes | None = None
        self.written = 0
        self.failures = 0
        self.healthy = True
        self._last_warning = 0.0

    def put(self, key: str, state_json: bytes) -> None:
        self._pending[key] = state_json

    def put_policies(self, version_json: bytes) -> None:
        """Copy this policy version message to Redis at the next flush."""
        self._policies = version_json

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Write what is pending; on failure keep it for the next flush. Returns keys written."""
        if not self._pending and self._policies is None:
            return 0
        batch, self._pending = self._pending, {}
        policies, self._policies = self._policies, None
        items = list(batch.items())
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for i in range(0, len(items), _CHUNK):
                    pipe.hset(self.states_hash, mapping=dict(items[i : i + _CHUNK]))
                if policies is not None and self.policies_key is not None:
                    pipe.set(self.policies_key, policies)
                await pipe.execute()
        except Exception as exc:  # redis errors and connection errors alike
            # Newer states that arrived meanwhile win over the batch we failed to write.
            batch.update(self._pending)
            self._pending = batch
            self._policies = self._policies or policies
            self.failures += 1
            if self.healthy or time.monotonic() - self._last_warning > 30:
                log.warning("Redis snapshot write failed (%s); will retry", exc)
                self._last_warning = time.monotonic()
            self.healthy = False
            return 0
        if not self.healthy:
            log.info("Redis snapshot writes resumed")
        self.healthy = True
        self.written += len(items)
        return len(items)

    async def read_all(self) -> dict[str, bytes] | None:
        """Every key's state in the snapshot (all workers' keys); None if Redis is away."""
        try:
            raw = await self._client.hgetall(self.states_hash)
        except Exception:  # redis errors and connection errors alike
            return None
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}

    async def close(self) -> None:
        await self._client.aclose()
