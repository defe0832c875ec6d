"""Record ids: the one definition of the SDK's id format, ``<16 hex prefix>-<hex counter>``.

Each SDK instance draws a random 64-bit prefix once and counts its records, so ids are unique
across the fleet and ~20x cheaper to mint than a uuid4 per call. The worker relies on the
format: for ids of this shape it keeps only each instance's newest counter and a 64-bit
window below it (see :mod:`quotaflow_stream.dedup`), where any other id costs an entry of its
own. The client mints with :class:`IdMinter`, the worker parses with :data:`SDK_ID`, and the
bench builds ids with :func:`record_id`: a change here reaches all three.
"""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Final

#: Hex digits of an instance prefix.
PREFIX_DIGITS: Final = 16

#: An SDK id: group 1 the instance prefix, group 2 its counter in hex (at most 64 bits).
SDK_ID: Final = re.compile(r"([0-9a-f]{16})-([0-9a-f]{1,16})")


def new_prefix() -> str:
    """A fresh random instance prefix."""
    return uuid.uuid4().hex[:PREFIX_DIGITS]


def record_id(prefix: str, counter: int) -> str:
    """The id of record ``counter`` of the instance with ``prefix``."""
    return f"{prefix}-{counter:x}"


def parse_sdk_id(rid: str) -> tuple[str, int] | None:
    """``(prefix, counter)`` of an SDK id, or None for an id of any other shape."""
    m = SDK_ID.fullmatch(rid)
    return None if m is None else (m[1], int(m[2], 16))


class IdMinter:
    """Mints the ids of one SDK instance: ``record_id(prefix, 0)``, ``..., 1)``, ..."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = new_prefix() if prefix is None else prefix
        if SDK_ID.fullmatch(record_id(self.prefix, 0)) is None:
            raise ValueError(f"an instance prefix is {PREFIX_DIGITS} lowercase hex digits")
        #: The prefix joined with its separator, and the counter: ``QuotaClient.record()``
        #: formats ``f"{head}{next(counter):x}"`` inline, a call less per record (test_dedup
        #: holds what it mints to this contract).
        self.head = self.prefix + "-"
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.head}{next(self.counter):x}"
