"""Policies: which limits apply to a counter key (and model), and what to do when state is stale.

A policy file is YAML::

    version: 1
    policies:
      - name: team-alpha
        keys: ["team-alpha"]            # exact ids or globs ("free-*")
        limits: {requests_per_minute: 600, tokens_per_minute: 90000, cost_per_day: 25.00}
        fail_mode: local                # open | closed | local
      - name: gpt4o-per-model
        keys: ["team-*"]
        models: ["gpt-4o*"]             # counted per key+model
        limits: {tokens_per_minute: 30000}
      - name: default
        default: true
        limits: {requests_per_minute: 60}

A limit is ``<unit>_per_<window>``: units as :mod:`quotaflow.units` lists them (requests,
prompt, completion and total tokens, uncached prompt tokens, images, and ``cost`` in dollars),
windows ``minute``, ``hour`` and ``day``, sliding, and ``month``, the calendar billing period in
the policy's ``timezone`` (:mod:`quotaflow.windows`).

For a call, at most one key-wide policy (no ``models``) and at most one model policy apply; each
is chosen by precedence: an exact key beats a glob, globs in file order, ``default`` last.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from quotaflow._exceptions import ConfigError
from quotaflow._yaml import Missing, read_yaml
from quotaflow.record import describe_validation_error
from quotaflow.units import MONEY, UNIT_NAMES, UNITS, dollars, dollars_to_micros
from quotaflow.windows import MONTH, WINDOW_SECONDS, bucket_size, month_period

FailMode = Literal["open", "closed", "local"]

#: The scope of key-wide counters (all models together).
KEY_SCOPE = ""


def _positive(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise ValueError("must be > 0")
    return value


def _money(value: Any) -> int | None:
    """A money limit: dollars in the document, integer micro-dollars inside."""
    if value is None:
        return None
    return dollars_to_micros(value)


#: A limit of a count (requests, tokens, images), and one of money (given in dollars).
_Count = Annotated[int | None, AfterValidator(_positive)]
_Dollars = Annotated[int | None, BeforeValidator(_money), AfterValidator(_positive)]


class _LimitsBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _at_least_one(self) -> _LimitsBase:
        if not any(v is not None for v in self.model_dump().values()):
            raise ValueError("set at least one limit, e.g. requests_per_minute")
        return self


if TYPE_CHECKING:

    class Limits(_LimitsBase):
        """Typing stand-in for the generated model below."""

        def __getattr__(self, name: str) -> int | None: ...

else:
    #: Per-window ceilings, ``<unit>_per_<window>`` for every unit and window (``tokens`` is
    #: prompt + completion, ``cost`` is in dollars); any subset may be set.
    Limits = create_model(
        "Limits",
        __base__=_LimitsBase,
        __doc__="Per-window ceilings, <unit>_per_<window> for every unit (quotaflow.units) and "
        "window; any subset may be set. Money limits are in dollars, kept as micro-dollars.",
        **{
            f"{unit}_per_{window}": (_Dollars if unit == MONEY else _Count, None)
            for unit in UNIT_NAMES
            for window in WINDOW_SECONDS
        },
    )


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One ceiling: ``name`` like ``tokens_per_minute``, its unit, window length and limit
    (micro-dollars for ``cost``)."""

    name: str
    unit: str
    window: int
    limit: int

    @property
    def money(self) -> bool:
        return self.unit == MONEY

    def show(self, amount: int) -> str:
        """An amount of this limit's unit as people read it (``$25.000000`` for money)."""
        return f"${dollars(amount)}" if self.money else str(amount)


class Policy(BaseModel):
    """A named set of limits, the keys (and optionally models) it covers, and its fail mode."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    keys: list[str] = Field(default_factory=list)
    default: bool = False
    models: list[str] | None = None
    limits: Limits
    fail_mode: FailMode = "open"
    max_staleness: float = Field(default=5.0, gt=0, description="Seconds before state is stale.")
    expected_instances: int = Field(
        default=1, ge=1, description="Instances sharing the key; the local fail mode divides by it."
    )
    budget_shares: bool = Field(
        default=True,
        description="Between two states, each instance admits at most its share of the "
        "remaining budget (see docs on bounded overshoot); false admits up to the whole remainder.",
    )
    count_routes: list[str] = Field(
        default_factory=list,
        description="Gateway routes beyond the metered ones (globs like '/v1/models*') that "
        "count as requests for keys under this policy.",
    )
    default_max_output_tokens: int = Field(
        default=1024,
        ge=1,
        description="Output tokens a reservation holds when a request sets none.",
    )
    unpriced: Literal["estimate", "reject", "free"] = Field(
        default="estimate",
        description="A call of a model the price table does not know: priced as "
        "`unpriced_as` and marked (estimate), denied by check() with reason unpriced (reject), "
        "or recorded at no cost (free).",
    )
    unpriced_as: str = Field(
        default="gpt-4o",
        min_length=1,
        max_length=128,
        description="The model whose prices an unpriced call is estimated at.",
    )
    timezone: str = Field(
        default="UTC",
        max_length=64,
        description="IANA time zone of the policy's _per_month limits: a month runs from the "
        "first at 00:00 there to the next.",
    )
    enforce: bool = Field(
        default=True,
        description="false: shadow mode. Decisions are computed and every call is admitted; "
        "would-be denials are counted and shown (the decision's `shadow`, SDK stats, the "
        "worker's /metrics), so a new limit can be rolled out safely.",
    )
    alerts: list[float] = Field(
        default_factory=list,
        max_length=16,
        description="Fractions of each limit (e.g. [0.5, 0.8, 1.0]): crossing one in a "
        "limit's period emits one event to the alerts topic.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            month_period(0.0, value)
        except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name like UTC or Europe/Paris)"
            ) from None
        return value

    @field_validator("alerts")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        for fraction in value:
            if not 0 < fraction <= 10:
                raise ValueError(f"{fraction} is not a fraction of a limit in (0, 10]")
        return sorted(set(value))

    @model_validator(mode="after")
    def _has_target(self) -> Policy:
        if self.default and self.keys:
            raise ValueError("a default policy matches every key; remove 'keys' or 'default'")
        if not self.default and not self.keys:
            raise ValueError("set 'keys' (ids or globs) or 'default: true'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty; omit it to cover every model")
        return self

    @cached_property
    def specs(self) -> tuple[LimitSpec, ...]:
        """The limits that are set, in a stable order (computed once: checks read it often)."""
        return _specs_of(self.limits)

    def spec_named(self, name: str) -> LimitSpec | None:
        """The limit called ``name`` (``tokens_per_minute``), if this policy sets it."""
        return next((spec for spec in self.specs if spec.name == name), None)

    def matches_model(self, model: str) -> bool:
        return self.models is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)


def _specs_of(limits: Limits) -> tuple[LimitSpec, ...]:
    specs = []
    for unit in UNIT_NAMES:
        for window_name, seconds in WINDOW_SECONDS.items():
            name = f"{unit}_per_{window_name}"
            value = getattr(limits, name)
            if value is not None:
                specs.append(LimitSpec(name, unit, seconds, value))
    return tuple(specs)


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    policies: list[Policy]

    @model_validator(mode="after")
    def _unique_names(self) -> PolicyFile:
        seen: set[str] = set()
        for p in self.policies:
            if p.name in seen:
                raise ValueError(f"policy name {p.name!r} is used twice")
            seen.add(p.name)
        return self


#: A limit as the request path reads it: (display name, unit index in
#: :data:`~quotaflow.units.UNIT_NAMES`, window, limit, bucket length of its sliding window, and
#: the unit's form: measure a, measure b or -1, and b's sign, as :data:`~quotaflow.units.UNITS`).
LimitRow = tuple[str, int, int, int, float, int, int, int]
UNIT_INDEX = {unit: i for i, unit in enumerate(UNIT_NAMES)}


@dataclass(frozen=True, slots=True)
class Binding:
    """A policy applied to a call: ``scope`` is ``""`` for key-wide counters, else the model.
    ``rows`` are its limits precomputed for the request path; ``windows`` their distinct
    window lengths (several limits can share one window); ``money`` whether one of them
    counts cost (the call must then be priced before it is checked)."""

    scope: str
    policy: Policy
    rows: tuple[LimitRow, ...] = ()
    windows: tuple[int, ...] = ()
    money: bool = False
    #: The windows whose own usage an instance keeps: those of a policy that fails ``local``
    #: (nothing else reads it).
    local_windows: tuple[int, ...] = ()

    @classmethod
    def of(cls, scope: str, policy: Policy) -> Binding:
        rows = tuple(
            (
                spec.name if scope == KEY_SCOPE else f"{scope}/{spec.name}",
                UNIT_INDEX[spec.unit],
                spec.window,
                spec.limit,
                bucket_size(spec.window),
                *UNITS[spec.unit],
            )
            for spec in policy.specs
        )
        windows = tuple(sorted({row[2] for row in rows}))
        money = any(spec.money for spec in policy.specs)
        local = windows if policy.fail_mode == "local" else ()
        return cls(scope, policy, rows, windows, money, local)


#: Characters that make a key pattern a glob (``fnmatch``'s); other patterns are exact ids.
_GLOB_CHARS = frozenset("*?[")


class _Precedence:
    """One class of policies (key-wide, or those covering a model) in precedence order, with
    the lookups precomputed: an exact key (a dict), then globs in file order, then the first
    ``default``. Resolving a key the memo has not seen (the first call of each key, every
    key again when the memo is cleared) costs one dict lookup and the globs, not a walk over
    every policy's key list."""

    __slots__ = ("default", "exact", "globs")

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.exact: dict[str, Policy] = {}
        self.globs: list[tuple[str, Policy]] = []
        self.default: Policy | None = None
        for p in policies:
            for pattern in p.keys:
                if _GLOB_CHARS.isdisjoint(pattern):
                    self.exact.setdefault(pattern, p)
                else:
                    self.globs.append((pattern, p))
            if p.default and self.default is None:
                self.default = p

    def pick(self, key: str) -> Policy | None:
        found = self.exact.get(key)
        if found is not None:
            return found
        for pattern, p in self.globs:
            if fnmatch.fnmatchcase(key, pattern):
                return p
        return self.default


class PolicySet:
    """Resolves which policies bind a (key, model) pair; results are memoised per pair."""

    _CACHE_MAX = 200_000

    def __init__(
        self,
        policies: Iterable[Policy],
        source: str = "<memory>",
        overrides: Mapping[tuple[str, str | None], Limits] | None = None,
    ) -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)
        self.source = source
        #: Temporary limits of one key (and model, or None for key-wide), on top of the policy
        #: that binds it: a boost or a clamp (``quotaflow limits set``).
        self.overrides: Mapping[tuple[str, str | None], Limits] = dict(overrides or {})
        self._by_name = {p.name: p for p in self.policies}
        #: Whether any policy has alerts (publication skips looking for them otherwise).
        self.alerting = any(p.alerts for p in self.policies)
        #: Whether any policy limits money (checks price calls only then).
        self.money = any(spec.money for p in self.policies for spec in p.specs)
        #: Time zones of the policies with _per_month limits: every scope keeps its month's
        #: usage in each (see quotaflow_stream.aggregate.prune).
        self.month_zones = tuple(
            sorted({p.timezone for p in self.policies if any(s.window == MONTH for s in p.specs)})
        )
        self._cache: dict[tuple[str, str | None], tuple[Binding, ...]] = {}
        self._key_wide = _Precedence(p for p in self.policies if p.models is None)
        # the model policies covering each model seen (a model's class does not depend on the
        # key), and one Binding per (scope, policy) shared by every key it binds
        self._by_model: dict[str, _Precedence] = {}
        self._bindings: dict[tuple[str, str], Binding] = {}

    def __len__(self) -> int:
        return len(self.policies)

    def get(self, name: str) -> Policy | None:
        return self._by_name.get(name)

    def resolve(self, key: str, model: str | None = None) -> tuple[Binding, ...]:
        """The bindings for a call: the key-wide policy, then the model policy (either optional)."""
        cache_key = (key, model)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        bindings: list[Binding] = []
        key_wide = self._key_wide.pick(key)
        override = self.overrides.get((key, None)) if self.overrides else None
        if override is not None:
            bindings.append(Binding.of(KEY_SCOPE, overridden(key_wide, key, None, override)))
        elif key_wide is not None:
            bindings.append(self._binding(KEY_SCOPE, key_wide))
        if model is not None:
            per_model = self._model_class(model).pick(key)
            override = self.overrides.get((key, model)) if self.overrides else None
            if override is not None:
                bindings.append(Binding.of(model, overridden(per_model, key, model, override)))
            elif per_model is not None:
                bindings.append(self._binding(model, per_model))
        result = tuple(bindings)
        if len(self._cache) >= self._CACHE_MAX:
            self._cache.clear()  # bounded memory; a miss only costs a re-resolve
        self._cache[cache_key] = result
        return result

    def _model_class(self, model: str) -> _Precedence:
        found = self._by_model.get(model)
        if found is None:
            if len(self._by_model) >= self._CACHE_MAX:
                self._by_model.clear()  # model names come from callers: bounded
            found = self._by_model[model] = _Precedence(
                p for p in self.policies if p.models is not None and p.matches_model(model)
            )
        return found

    def _binding(self, scope: str, policy: Policy) -> Binding:
        found = self._bindings.get((scope, policy.name))
        if found is None:
            if len(self._bindings) >= self._CACHE_MAX:
                self._bindings.clear()
            found = self._bindings[(scope, policy.name)] = Binding.of(scope, policy)
        return found


def overridden(policy: Policy | None, key: str, model: str | None, limits: Limits) -> Policy:
    """``policy`` with the limits an override sets replacing its own (the others stay); with
    no policy binding the key, a policy of the override's limits alone."""
    changed = {name: getattr(limits, name) for name in limits.model_fields_set}
    if policy is None:
        return Policy.model_construct(
            name=f"override:{key}", keys=[key], models=[model] if model else None,
            limits=limits,
        )  # fmt: skip
    fields = {name: getattr(policy, name) for name in type(policy).model_fields}
    # a fresh model, not model_copy: that would carry the cached specs of the old limits
    return Policy.model_construct(**{**fields, "limits": policy.limits.model_copy(update=changed)})


def parse_limits(doc: Any, what: str = "limits") -> Limits:
    """Limits as a policy's ``limits`` mapping states them (money in dollars); raises
    ConfigError naming the field."""
    try:
        return Limits.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{what}: {describe_validation_error(exc)}") from None


def parse_policies(doc: Any, source: str = "<memory>") -> PolicySet:
    """Validate a policy document (already parsed YAML/JSON); errors name source, path, field."""
    try:
        parsed = PolicyFile.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None
    return PolicySet(parsed.policies, source=source)


def load_policies(path: str | Path) -> PolicySet:
    """Load and validate a YAML policy file; any problem raises :class:`ConfigError`."""
    path = Path(path)
    try:
        doc = read_yaml(path, "policy file")
    except Missing:
        raise ConfigError(f"{path}: policy file not found (set QUOTAFLOW_POLICIES_FILE)") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'policies' list")
    return parse_policies(doc, source=str(path))
