"""Integrations with LLM client libraries (each needs its extra, e.g. ``quotaflow[openai]``)."""
