"""Test doubles that ship with the package: a local OpenAI-compatible upstream that behaves like
a provider, for the tests, the gateway bench and trying the gateway offline. (The SDK's own
double, :class:`quotaflow.transports.MemoryTransport`, lives beside the real transport.)"""

from quotaflow_producers.testing.upstream import REPLY, OpenAIStub

__all__ = ["REPLY", "OpenAIStub"]
