"""The OpenAI-compatible metering gateway: the same quotas and usage records for services that
cannot embed the SDK."""

from quotaflow_producers.gateway.server import Gateway

__all__ = ["Gateway"]
