"""Fixtures of the integration tests beyond the shared pipeline (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from quotaflow_producers.testing import OpenAIStub


@pytest.fixture(scope="module")
def stub() -> Iterator[OpenAIStub]:
    """A local provider-like upstream of the module's own."""
    s = OpenAIStub().start()
    yield s
    s.stop()
