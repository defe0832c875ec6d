"""The fast path of ``check()``: what a key and model may still spend, precomputed.

Most checks are of a key far from every limit. The full decision (:meth:`QuotaCache.check`)
walks every binding and limit, subtracts expired buckets and scans this process's pending
usage: several microseconds. When it admits a call, it also leaves a :class:`Headroom` for the
key and model: per limit, what is left (``lefts``), and per unit form the tightest bound of any
limit counting it, its share of the fleet's budget included (``gates``). The next check of the
key and model compares the call with the gates, a comparison per unit, and admits if every one
fits; otherwise (or once the headroom has expired) the full decision runs and answers.

Why this is exact, never lenient: between two full decisions, what is left only grows by
itself (buckets expire, pending usage leaves its window, a month ends, which each only free
budget), and what this process spends is charged to the headroom as it records it
(:func:`charge`); a released hold is given back to the headroom of its model, whose every
limit counted it (the gateway reserves and settles every call: this keeps it on the fast path).
Everything else that changes it forgets it: a new state of the key (the fleet's usage), new
policies, a changed fleet size, and, to keep its figures exact, a hold released to a headroom
of another model or pending usage expired. A headroom expires before
the stream could be deemed silent (the fail modes are then the full path's to apply) and before
the first moment the full decision would count differently (an expiry or a pending call
leaving a window, a month or a price's end), and it holds only from the moment it was made (a
clock stepped back would see buckets expired that have not), so the lazily built ``remaining``
of a fast admission is the full path's figure too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from operator import add
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from quotaflow.prices import RATE_SCALE, ModelPrices, Rates
from quotaflow.units import COST, MEASURES, MONEY, UNITS

if TYPE_CHECKING:
    from quotaflow.decision import Reason

#: A gate: ``[a, b, sign, bound]``: a call fits if measure ``a`` plus ``sign`` x measure ``b``
#: is below ``bound``. Strictly below: a call of exactly what is left, or asking for nothing
#: at 0 left, goes to the full path, which knows the rule for those. A list: charged in place.
Gate = list[int]

#: Nothing spent yet, per measure.
NOTHING = (0,) * len(MEASURES)


class Headroom:
    """What a key may still spend with one model (see the module's docstring)."""

    __slots__ = (
        "forms",
        "gates",
        "gates_unpriced",
        "keywide",
        "lefts",
        "made",
        "names",
        "per_token",
        "policy",
        "prices",
        "rates",
        "reason",
        "spent",
        "spent_elsewhere",
        "until",
    )

    def __init__(
        self,
        made: float,
        until: float,
        gates: list[Gate],
        names: tuple[str, ...],
        forms: tuple[tuple[int, int, int], ...],
        lefts: tuple[int, ...],
        keywide: tuple[bool, ...],
        reason: Reason,
        policy: str | None,
        prices: ModelPrices | None,
    ) -> None:
        #: Local clock times it holds from and until (a clock stepped back before ``made``
        #: would see buckets expired that have not: it does not hold then either).
        self.made, self.until = made, until
        self.gates = gates
        #: Per limit: its name, unit form, what was left of it, whether it is key-wide.
        self.names, self.forms, self.lefts, self.keywide = names, forms, lefts, keywide
        #: What this process has spent since, per measure: with any model (key-wide limits
        #: count it), and of that with other models (this model's limits do not). Tuples,
        #: replaced whole: an admission keeps the pair it saw, for its ``remaining``.
        self.spent = self.spent_elsewhere = NOTHING
        #: The decision's reason and policy (``ok`` and the first binding's, or ``no_policy``).
        self.reason, self.policy = reason, policy
        #: The model's prices, where a money limit binds: calls are priced here.
        self.prices = prices
        #: Where they are flat (no tiers): the rates a check pays for, reduced (see
        #: :func:`check_rates`).
        self.rates = None if prices is None or prices.tiers else check_rates(prices.rates)
        #: The gates a call that comes without its cost is held to, where its price can be
        #: bounded by its tokens (:func:`token_price`): the money gate as a token gate, so
        #: that such a call is not priced at all (None: it is priced, and held to ``gates``).
        self.gates_unpriced: list[Gate] | None = None
        self.per_token = per_token = token_price(self.rates)
        if per_token is not None:
            self.gates_unpriced = [
                [*TOKENS_FORM, tokens_within(gate[3], self.rates, per_token)]  # type: ignore[arg-type]
                if (gate[0], gate[1], gate[2]) == MONEY_FORM
                else list(gate)
                for gate in gates
            ]


def gates_of(forms: Sequence[tuple[int, int, int]], bounds: Sequence[int]) -> list[Gate]:
    """One gate per unit form, the tightest bound of the limits counting it."""
    tightest: dict[tuple[int, int, int], int] = {}
    for form, bound in zip(forms, bounds, strict=True):
        if form not in tightest or bound < tightest[form]:
            tightest[form] = bound
    return [[*form, bound] for form, bound in tightest.items()]


def charge(room: Headroom, same_model: bool, measures: Sequence[int]) -> None:
    """Take a call this process made (its ``measures``) off a headroom. Its model's limits count
    it only where ``same_model``; a gate may mix key-wide and model limits, so it is charged in
    any case (conservative: a call of another model can only close it sooner). On record()'s
    path: flat code."""
    for gate in room.gates:
        a, b, sign, _ = gate
        gate[3] -= measures[a] + sign * measures[b] if sign else measures[a]
    unpriced = room.gates_unpriced
    if unpriced is not None:
        # the same, the money gate's token bound taken from the money gate just charged
        for gate, exact in zip(unpriced, room.gates, strict=True):
            a, b, sign, _ = exact
            if a == COST:
                gate[3] = tokens_within(exact[3], room.rates, room.per_token)  # type: ignore[arg-type]
            else:
                gate[3] = exact[3]
    room.spent = tuple(map(add, room.spent, measures))
    if not same_model:
        room.spent_elsewhere = tuple(map(add, room.spent_elsewhere, measures))


def remaining_of(
    room: Headroom, spent: tuple[int, ...], elsewhere: tuple[int, ...], call: tuple[Any, ...]
) -> Mapping[str, int]:
    """What each limit of a headroom has left after ``call`` (its measures), with ``spent``
    spent since the headroom was made, ``elsewhere`` of it with other models."""
    if call[COST] is None:  # admitted without pricing it (gates_unpriced): priced now
        prices = room.prices
        requests, prompt, completion, cached, images, _ = call
        cost = 0 if prices is None else prices.cost(
            prompt, completion, cached, 0, 0, images, requests
        )  # fmt: skip
        call = (*call[:COST], cost)
    out = {}
    for name, (a, b, sign), left in zip(
        room.names, room.forms, lefts_after(room, spent, elsewhere), strict=True
    ):
        left -= call[a] + sign * call[b] if sign else call[a]
        out[name] = left if left > 0 else 0
    return MappingProxyType(out)


def lefts_after(room: Headroom, spent: tuple[int, ...], elsewhere: tuple[int, ...]) -> list[int]:
    """What each limit of a headroom has left (below 0 where overspent) with ``spent`` spent
    since it was made, ``elsewhere`` of it with other models (which model limits do not
    count)."""
    out = []
    for (a, b, sign), left, keywide in zip(room.forms, room.lefts, room.keywide, strict=True):
        left -= spent[a] + sign * spent[b] if sign else spent[a]
        if not keywide:
            left += elsewhere[a] + sign * elsewhere[b] if sign else elsewhere[a]
        out.append(left)
    return out


@functools.lru_cache(maxsize=1024)
def check_rates(rates: Rates) -> tuple[int, int, int, int, int, int, int]:
    """The rates a check's call is priced at, ``(prompt, completion, request, cached prompt
    token, image, half, whole)``, so that its cost is ``(prompt x p + ... + half) // whole``:
    :meth:`ModelPrices.cost` (which rounds half up at RATE_SCALE) with every figure divided by
    their common divisor. The same micro-dollars in small integers, which Python multiplies
    several times faster than the 60-bit and wider products of the full scale. Memoized: the
    headrooms of a model share one tuple (a check reads it: one place in the CPU's cache)."""
    r_in, r_out, r_req, d_read, _, _, r_img = rates
    common = math.gcd(r_in, r_out, r_req, d_read, r_img, RATE_SCALE)
    return (
        2 * r_in // common, 2 * r_out // common, 2 * r_req // common, 2 * d_read // common,
        2 * r_img // common, RATE_SCALE // common, 2 * RATE_SCALE // common,
    )  # fmt: skip


#: The unit forms of money and tokens: the money gate is turned into a token gate.
MONEY_FORM = UNITS[MONEY]
TOKENS_FORM = UNITS["tokens"]


def token_price(rates: tuple[int, ...] | None) -> int | None:
    """The most one token of a call can cost, in reduced rate units, where a call's price is
    bounded by its tokens: flat prices with no per-request or per-image part, cached tokens no
    dearer than others (a check sees neither cache writes nor reasoning); else None."""
    if rates is None:
        return None
    r_in, r_out, r_req, d_read, r_img, _, _ = rates
    if r_req or r_img or d_read > 0 or r_in < 0 or r_out < 0:
        return None
    return max(r_in, r_out, 1)


def tokens_within(bound: int, rates: tuple[int, ...], per_token: int) -> int:
    """A token gate implied by the money gate ``bound``: a call of fewer tokens costs less than
    ``bound`` micro-dollars. Its price rounds up from ``(scaled + half) // whole`` with
    ``scaled <= tokens x per_token``, so ``tokens x per_token < bound x whole - half`` is
    enough."""
    room_scaled = bound * rates[6] - rates[5]
    return -(-room_scaled // per_token) if room_scaled > 0 else 0
