"""A QuotaClient whose usage goes to memory (no broker), for unit tests of what is recorded."""

from __future__ import annotations

from collections.abc import Iterator

from quotaflow import QuotaClient, load_settings
from quotaflow.policies import PolicySet
from quotaflow.record import UsageRecord
from quotaflow.transports import MemoryTransport


def memory_quota(policies: PolicySet, usage: MemoryTransport, source: str) -> Iterator[QuotaClient]:
    """An open client that has heard from the stream (so nothing is stale), closed after."""
    quota = QuotaClient(load_settings(client={"source": source}), policies=policies,
                        transport=usage, follow=False)  # fmt: skip
    quota.cache.mark_heard()
    quota.open()
    yield quota
    quota.close()


def sent_records(quota: QuotaClient, usage: MemoryTransport) -> list[UsageRecord]:
    """Every record the client has sent, after handing it the ones it buffers."""
    assert quota.emitter is not None
    quota.emitter._drain()
    return usage.records()
