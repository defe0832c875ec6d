"""Units: what a limit can count, as sums of the measures every counter keeps.

Every bucket, state window, pending call and own-usage slot holds the same vector of
:data:`MEASURES`, in this order. A limit's unit is one measure, or two combined:

| unit | value | |
|---|---|---|
| ``requests`` | requests | |
| ``prompt_tokens`` | prompt tokens | cached and cache-write tokens included |
| ``completion_tokens`` | completion tokens | reasoning tokens included |
| ``tokens`` | prompt + completion | |
| ``uncached_prompt_tokens`` | prompt - cached prompt | Anthropic's cache-aware input limit |
| ``images`` | images | OpenAI's images per minute |
| ``cost`` | cost in micro-dollars | dollars in policy files and on screen |

Adding a unit is one row in :data:`UNITS`; adding a measure is one name in :data:`MEASURES`
(and a wider bucket: entries and states saved with fewer measures are widened on load). Money
is counted in integer micro-dollars everywhere: sums of floats drift, integers do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Final

#: What every counter keeps per bucket, in this order (``cost_micros``: integer micro-dollars).
MEASURES: Final = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "images",
    "cost_micros",
)
#: How many measures a bucket holds.
WIDTH: Final = len(MEASURES)
REQUESTS, PROMPT, COMPLETION, CACHED, IMAGES, COST = range(WIDTH)

#: A unit as ``(measure, other measure or -1, sign of the other)``: value = m[a] + sign * m[b].
UnitForm = tuple[int, int, int]

#: Every unit a limit can count, in the order policies list them.
UNITS: Final[dict[str, UnitForm]] = {
    "requests": (REQUESTS, -1, 0),
    "prompt_tokens": (PROMPT, -1, 0),
    "completion_tokens": (COMPLETION, -1, 0),
    "tokens": (PROMPT, COMPLETION, 1),
    "uncached_prompt_tokens": (PROMPT, CACHED, -1),
    "images": (IMAGES, -1, 0),
    "cost": (COST, -1, 0),
}
#: Units in a stable order; a limit row carries its unit's index here.
UNIT_NAMES: Final = tuple(UNITS)
UNIT_FORMS: Final = tuple(UNITS.values())
#: The unit limited in money (its limits are written in dollars).
MONEY: Final = "cost"

#: Micro-dollars in a dollar.
MICROS: Final = 1_000_000


def unit_value(unit: int, m: Sequence[float], at: int = 0) -> int:
    """The value of unit number ``unit`` over the measures ``m[at : at + WIDTH]`` (a bucket,
    a state window or a pending call lays its measures out after a prefix of ``at`` items)."""
    a, b, sign = UNIT_FORMS[unit]
    value = m[at + a]
    if b >= 0:
        value += sign * m[at + b]
    return int(value)


def widen(flat: list[float], stride: int) -> list[float]:
    """Flat buckets of ``stride - 1`` measures each (saved by an earlier version) with the
    measures added since as zeros."""
    if stride == WIDTH + 1:
        return flat
    pad = [0.0] * (WIDTH + 1 - stride)
    out: list[float] = []
    for i in range(0, len(flat), stride):
        out += flat[i : i + stride]
        out += pad
    return out


def dollars_to_micros(value: object, where: str = "") -> int:
    """A dollar amount from a policy or a command line (``25``, ``25.5``, ``"0.000001"``) as
    integer micro-dollars, exactly; raises ``ValueError`` (naming ``where`` if given) if it is
    not a non-negative amount in whole micro-dollars."""
    at = f"{where}: " if where else ""
    if isinstance(value, bool):
        raise ValueError(f"{at}{value!r} is not a dollar amount")
    try:
        amount = Decimal(str(value).strip().removeprefix("$"))
    except (InvalidOperation, ValueError):
        raise ValueError(f"{at}{value!r} is not a dollar amount") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{at}{value!r} is not a dollar amount >= 0")
    micros = amount * MICROS
    if micros != micros.to_integral_value():
        raise ValueError(f"{at}{value!r} is finer than a micro-dollar (0.000001)")
    return int(micros)


def dollars(micros: int | None) -> str:
    """Micro-dollars as a dollar amount, exactly (no float): 1234567 -> ``1.234567``; ``""``
    for None (unpriced)."""
    if micros is None:
        return ""
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    return f"{sign}{micros // MICROS}.{micros % MICROS:06d}"
