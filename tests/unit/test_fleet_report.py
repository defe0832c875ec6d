"""The simulator's measurements on hand-made call logs (no processes, no broker)."""

from __future__ import annotations

import pytest

from quotaflow.policies import parse_policies
from quotaflow_producers import fleet_report as report
from quotaflow_producers.simulate import analyse, policies_yaml, sim_keys


def calls(admitted: list[tuple[float, int]], denied: list[tuple[float, int]] = ()) -> report.Calls:
    return report.Calls.of(admitted, denied)


def test_overshoot_is_the_busiest_sliding_window_over_the_limit() -> None:
    # 10 at t=0..9 and 3 more at t=59.5: the window (-0.5, 59.5] holds 13 of a limit of 10
    c = calls([(float(t), 1) for t in range(10)] + [(59.5, 1)] * 3)
    assert report.overshoot_pct(c, 10, 60) == pytest.approx(30.0)
    # the same three a little later fall in a window that no longer holds t=0..2
    c = calls([(float(t), 1) for t in range(10)] + [(62.5, 1)] * 3)
    assert report.overshoot_pct(c, 10, 60) == 0.0


def test_under_admission_averages_unused_budget_over_full_windows() -> None:
    c = calls([(0.5, 8)])  # 8 of 10 used, then nothing
    # the window ending at 60 holds the 8 (20 % unused), the one ending at 61 nothing (100 %)
    assert report.under_admission_pct(c, 10, 60, 0.0, 60.5) == pytest.approx(20.0)
    assert report.under_admission_pct(c, 10, 60, 0.0, 61.0) == pytest.approx(60.0)
    assert report.under_admission_pct(c, 10, 60, 0.0, 30.0) is None


def test_the_worst_steady_window_is_what_the_mean_hides() -> None:
    # 10 a second admitted for 3 minutes (limit 600 a minute: full), but 20 seconds from
    # t=100 to t=120 admitted nothing: the mean barely moves, the worst window shows a third
    full = [(t + 0.5, 10) for t in range(180) if not 100 <= t < 120]
    c = calls(full)
    mean = report.under_admission_pct(c, 600, 60, 0.0, 180.0)
    worst = report.worst_window_under_admission_pct(c, 600, 60, 0.0, 180.0)
    assert mean is not None and worst is not None
    assert worst == pytest.approx(100 * 200 / 600) and mean < worst / 2
    # the first window (the start-up burst) is not a steady one: a slow first minute is ignored
    slow_start = calls([(t + 0.5, 10) for t in range(30, 180)])
    assert report.worst_window_under_admission_pct(slow_start, 600, 60, 0.0, 180.0) == 0.0
    assert report.under_admission_pct(slow_start, 600, 60, 0.0, 180.0) > 0
    assert report.worst_window_under_admission_pct(c, 600, 60, 0.0, 119.0) is None


def test_the_exact_limiter_admits_what_fits_in_the_true_sliding_window() -> None:
    # limit 10 a minute; offered (admitted or denied by quotaflow alike, in time order)
    c = calls([(0.0, 6), (30.0, 3)], denied=[(10.0, 2), (59.0, 2), (60.0, 5), (61.0, 2)])
    exact = report.exact_limiter(c, 10, 60)
    # 6 + 2 + ... at 30 the 3 does not fit (8 + 3); at 59 the 2 fits (10); at 60 the 6 has
    # left the window (0, 60]: 4 used, the 5 fits; at 61 nothing more has left: 9 + 2
    assert list(zip(exact.admitted_at, exact.admitted_size, strict=True)) == [
        (0.0, 6),
        (10.0, 2),
        (59.0, 2),
        (60.0, 5),
    ]
    assert list(zip(exact.denied_at, exact.denied_size, strict=True)) == [(30.0, 3), (61.0, 2)]
    assert report.overshoot_pct(exact, 10, 60) == 0.0


def test_a_critically_loaded_burst_leaves_a_worst_window_even_for_an_exact_limiter() -> None:
    """Offered calls at exactly the rate budget frees, with a gap: the exact limiter cannot
    spend what freed in the gap later, so its worst window shows what the load leaves."""
    # 8 a second (limit 480 a minute: the rate it frees at) but none in [130, 131); times are
    # binary fractions clear of the sampled window edges
    offered = [(t / 8 + 1 / 16, 1) for t in range(0, 1440) if not 1040 <= t < 1048]
    exact = report.exact_limiter(calls([], denied=offered), 480, 60)
    assert len(exact.admitted_at) == len(offered), "nothing offered exceeds the limit"
    worst = report.worst_window_under_admission_pct(exact, 480, 60, 0.0, 180.0)
    assert worst == pytest.approx(100 * 8 / 480)


def test_blocked_with_budget_counts_denials_that_had_room() -> None:
    c = calls([(1.0, 5)], denied=[(2.0, 4), (3.0, 6)])
    # at t=2: 5 used + 4 wanted + 1 % slack fits in 10; at t=3: 5 + 6 does not
    assert report.blocked_with_budget_pct(c, 10, 60) == pytest.approx(50.0)
    assert report.blocked_with_budget_pct(calls([(1.0, 5)]), 10, 60) is None


def test_percentiles_and_propagation() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert report.percentile(list(range(1, 101)), 99) == 99
    applied = {("k", 1.0): [10.05, 10.08], ("k", 2.0): [11.0]}
    watermarks = {("k", 1.0): 10.0, ("k", 2.0): 10.9}
    # the second state reached one of two instances only: it is left out
    assert report.propagation_ms(applied, watermarks, 2) == [pytest.approx(80.0)]
    # in two stages: produced (watermark 10.0) -> published (10.03) -> last applied (10.08)
    staged = {("k", 10.03): [10.05, 10.08], ("k", 11.0): [11.0]}
    marks = {("k", 10.03): 10.0, ("k", 11.0): 10.9}
    to_publish, to_apply = report.propagation_stages_ms(staged, marks, 2)
    assert to_publish == [pytest.approx(30.0)] and to_apply == [pytest.approx(50.0)]


def test_run_policies_parse_and_cover_both_arms() -> None:
    policies = parse_policies(__import__("yaml").safe_load(policies_yaml(1200, 800_000)))
    keys = sim_keys(2)
    assert [k[0] for k in keys] == [
        "sim-shares-req-0", "sim-shares-tok-1", "sim-async-req-0", "sim-async-tok-1",
    ]  # fmt: skip
    for key, arm, bound in keys:
        (binding,) = policies.resolve(key, "gpt-4o-mini")
        assert binding.policy.budget_shares is (arm == "shares")
        limits = {s.name: s.limit for s in binding.policy.specs}
        binding_limit = "requests_per_minute" if bound == "requests" else "tokens_per_minute"
        assert limits[binding_limit] == (1200 if bound == "requests" else 800_000)
    # with a budget, a key per arm is bound by money alone
    policies = parse_policies(__import__("yaml").safe_load(policies_yaml(1200, 800_000, 2.5)))
    money = [k for k in sim_keys(2, money=True) if k[2] == "cost"]
    assert [k[0] for k in money] == ["sim-shares-usd-0", "sim-async-usd-0"]
    for key, arm, _ in money:
        (binding,) = policies.resolve(key, "gpt-4o-mini")
        assert [(s.name, s.limit) for s in binding.policy.specs] == [("cost_per_minute", 2_500_000)]
        assert binding.policy.budget_shares is (arm == "shares")


def test_analyse_merges_instances_per_arm() -> None:
    keys = sim_keys(2, money=True)
    # (time, requests, tokens, cost) admitted; (time, requests, tokens, cost, reason) denied
    log_a = {
        "admitted": {"sim-shares-req-0": [[1.0, 1, 700, 9]], "sim-async-req-0": [[1.0, 1, 700, 9]],
                     "sim-shares-usd-0": [[1.0, 1, 700, 600]]},
        "denied": {"sim-async-req-0": [[2.0, 1, 500, 7, "limit"]]},
        "check_ns": [2000, 4000],
        "applied": {"sim-async-req-0|5.0": [4.9, 4.95]},
        "reasons": {"ok": 2, "limit": 1},
    }  # fmt: skip
    log_b = {
        "admitted": {"sim-async-req-0": [[1.5, 1, 700, 9], [1.6, 1, 700, 9]],
                     "sim-shares-usd-0": [[1.2, 1, 700, 600]]},
        "denied": {},
        "check_ns": [3000],
        "applied": {"sim-async-req-0|5.0": [4.9, 4.99]},
        "reasons": {"ok": 2},
    }  # fmt: skip
    limits = {"requests": 2, "tokens": 10_000, "cost": 1000}
    out = analyse([log_a, log_b], keys, limits, started=0.0, ended=10.0, instances=2)
    assert out["baseline_without_shares"]["keys"]["sim-async-req-0"]["admitted"] == 3
    assert out["baseline_without_shares"]["requests"]["overshoot_pct_max"] == pytest.approx(50.0)
    assert out["with_shares"]["requests"]["overshoot_pct_max"] == 0.0
    # a money-bound key is measured in micro-dollars: 1,200 of 1,000 is 20 % over
    assert out["with_shares"]["cost"]["overshoot_pct_max"] == pytest.approx(20.0)
    assert out["with_shares"]["keys"]["sim-shares-usd-0"]["limit_per_minute"] == 1000
    assert out["baseline_without_shares"]["propagation_ms"]["p50"] == pytest.approx(90.0)
    stages = out["baseline_without_shares"]["propagation_stages_ms"]
    assert stages["produced_to_published"]["p50"] == pytest.approx(100.0), "4.9 -> 5.0"
    assert out["check_us"]["p50"] == 3.0
    assert out["decisions_by_reason"] == {"ok": 4, "limit": 1}
    # the exact limiter on the same offered calls: run shorter than two windows, no figure
    assert out["with_shares"]["requests"]["exact_limiter_worst_window_pct"] is None
