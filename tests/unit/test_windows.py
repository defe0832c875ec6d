import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotaflow.windows import (
    DAY,
    HOUR,
    MINUTE,
    bucket_expires_at,
    bucket_size,
    bucket_start,
    format_duration,
    frees_at,
    is_expired,
    sliding_floor,
    window_end,
    window_start,
)


@pytest.mark.parametrize(
    ("ts", "size", "start"),
    [
        (0.0, MINUTE, 0),
        (59.999, MINUTE, 0),
        (60.0, MINUTE, 60),
        (1_700_000_123.4, MINUTE, 1_700_000_100),
        (1_700_000_123.4, HOUR, 1_699_999_200),
        (1_700_000_123.4, DAY, 1_699_920_000),
    ],
)
def test_window_start_is_aligned_to_epoch(ts: float, size: int, start: int) -> None:
    assert window_start(ts, size) == start
    assert window_end(ts, size) == start + size
    assert start <= ts < start + size


def test_usage_frees_when_enough_of_it_has_expired() -> None:
    frees = [(10.0, 3), (20.0, 4), (30.0, 5)]  # 12 used, freeing at 10, 20, 30
    assert frees_at(12, allowed=9, frees=frees, now=0.0, fallback=99.0) == 10.0
    assert frees_at(12, allowed=5, frees=frees, now=0.0, fallback=99.0) == 20.0
    assert frees_at(12, allowed=0, frees=frees, now=0.0, fallback=99.0) == 30.0
    # what freed by now is no answer: the next moment after now that suffices
    assert frees_at(12, allowed=9, frees=frees, now=15.0, fallback=99.0) == 20.0
    assert frees_at(12, allowed=-1, frees=frees, now=0.0, fallback=99.0) == 99.0


def test_buckets_slide_each_window_in_small_steps() -> None:
    assert (bucket_size(MINUTE), bucket_size(HOUR), bucket_size(DAY)) == (0.125, 30, 900)
    assert bucket_start(125.7, MINUTE) == 125.625
    # at 125.7 the counted buckets start in [65.625, 125.625]: they cover [65.625, 125.75),
    # which holds the sliding interval (65.7, 125.7]
    assert sliding_floor(125.7, MINUTE) == 65.625
    assert bucket_expires_at(65.625, MINUTE) == 125.75


def test_bucket_expires_only_after_grace() -> None:
    # bucket [60, 60.125) of a minute window counts until 120.125; with 10 s grace it accepts
    # records until the watermark reaches 130.125
    assert not is_expired(60, MINUTE, watermark=130.1, grace=10)
    assert is_expired(60, MINUTE, watermark=130.125, grace=10)
    assert is_expired(60, MINUTE, watermark=120.125, grace=0)


@given(
    events=st.lists(st.floats(min_value=0, max_value=400, allow_nan=False), max_size=60),
    now=st.floats(min_value=0, max_value=400, allow_nan=False),
    size=st.sampled_from([MINUTE, HOUR]),
)
def test_sliding_estimate_never_undercounts_and_errs_by_one_bucket_at_most(
    events: list[float], now: float, size: int
) -> None:
    """The stated bound: true sliding count <= estimate <= true count + one bucket's usage."""
    events = [t for t in events if t <= now]
    floor = sliding_floor(now, size)
    estimate = sum(1 for t in events if bucket_start(t, size) >= floor)
    true = sum(1 for t in events if now - size < t <= now)
    oldest = sum(1 for t in events if bucket_start(t, size) == floor)
    assert true <= estimate <= true + oldest


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(360, "6m0s"), (0.35, "350ms"), (1.5, "1.5s"), (3723, "1h2m3s"), (-2, "0ms"), (59, "59s")],
)
def test_format_duration_matches_openai_headers(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
