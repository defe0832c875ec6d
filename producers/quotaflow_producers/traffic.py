"""Simulated LLM traffic: SDK instances that check, call (pretend) and record.

Each instance is a real :class:`QuotaClient` with its own producer and follower, so a handful of
them in one process behave like a small fleet. Token sizes follow a log-normal mix, as real
prompts do: mostly short, with a long tail.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from quotaflow.client import QuotaClient
from quotaflow.policies import PolicySet
from quotaflow.settings import QuotaflowSettings


@dataclass(frozen=True)
class KeyProfile:
    key: str
    weight: float
    models: tuple[str, ...] = ("gpt-4o-mini",)


DEFAULT_PROFILES: tuple[KeyProfile, ...] = (
    KeyProfile("team-alpha", 4, ("gpt-4o-mini", "gpt-4o")),
    KeyProfile("batch-nightly", 3, ("gpt-4o-mini", "gpt-4o")),
    KeyProfile("free-alice", 1),
    KeyProfile("free-bob", 1),
    KeyProfile("acme", 2, ("gpt-4o-mini", "o3-mini")),
)


@dataclass
class KeyTally:
    """What one instance did for one key."""

    records: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    denied: int = 0

    def add(self, other: KeyTally) -> None:
        self.records += other.records
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.denied += other.denied


@dataclass
class InstanceReport:
    source: str
    tallies: dict[str, KeyTally] = field(default_factory=lambda: defaultdict(KeyTally))
    #: How many decisions gave each reason (``ok``, ``limit``, ``stale_open``...).
    reasons: Counter[str] = field(default_factory=Counter)
    undelivered: int = 0


# log-normal (mu, sigma) of prompt and completion sizes
_PROMPT = (6.0, 0.8)
_COMPLETION = (4.8, 0.7)


def sample_tokens(rng: random.Random) -> tuple[int, int]:
    """A (prompt, completion) pair: log-normal around ~400 prompt and ~120 completion tokens."""
    prompt = max(1, min(int(rng.lognormvariate(*_PROMPT)), 16000))
    completion = max(1, min(int(rng.lognormvariate(*_COMPLETION)), 4000))
    return prompt, completion


def mean_tokens() -> float:
    """Mean tokens per call of :func:`sample_tokens` (the clipping moves it by well under 1 %)."""
    return sum(mean_prompt_and_completion())


def mean_prompt_and_completion() -> tuple[float, float]:
    """Mean prompt and completion tokens per call of :func:`sample_tokens`."""
    prompt, completion = (math.exp(mu + sigma**2 / 2) for mu, sigma in (_PROMPT, _COMPLETION))
    return prompt, completion


class TrafficInstance(threading.Thread):
    """One simulated service instance offering ``rate`` calls per second."""

    def __init__(
        self,
        settings: QuotaflowSettings,
        policies: PolicySet,
        source: str,
        rate: float,
        profiles: tuple[KeyProfile, ...] = DEFAULT_PROFILES,
        seed: int | None = None,
    ) -> None:
        super().__init__(name=f"traffic-{source}", daemon=True)
        cfg = settings.model_copy(deep=True)
        cfg.client.source = source
        self.client = QuotaClient(cfg, policies=policies)
        self.rate = rate
        self.profiles = profiles
        self.rng = random.Random(seed)
        self.report = InstanceReport(source)
        self._stop_event = threading.Event()

    def open(self) -> None:
        self.client.open()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        weights = [p.weight for p in self.profiles]
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            profile = self.rng.choices(self.profiles, weights)[0]
            model = self.rng.choice(profile.models)
            prompt, completion = sample_tokens(self.rng)
            tally = self.report.tallies[profile.key]
            decision = self.client.check(
                profile.key, model, prompt_tokens=prompt, completion_tokens=completion
            )
            self.report.reasons[decision.reason] += 1
            if decision.allowed:
                self.client.record(
                    profile.key, model, prompt_tokens=prompt, completion_tokens=completion
                )
                tally.records += 1
                tally.requests += 1
                tally.prompt_tokens += prompt
                tally.completion_tokens += completion
            else:
                tally.denied += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop_event.wait(delay)
            else:
                next_at = time.monotonic()  # fell behind: do not burst to catch up

    def close(self) -> None:
        self.report.undelivered = self.client.close()
