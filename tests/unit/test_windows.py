import pytest

from quotaflow.windows import (
    DAY,
    HOUR,
    MINUTE,
    format_duration,
    is_closed,
    seconds_until_reset,
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


def test_seconds_until_reset_stays_within_one_window() -> None:
    assert seconds_until_reset(120.0, MINUTE) == 60.0
    assert seconds_until_reset(179.5, MINUTE) == pytest.approx(0.5)


def test_window_closes_only_after_grace() -> None:
    # window [60, 120) with 10 s grace accepts records until the watermark reaches 130
    assert not is_closed(60, MINUTE, watermark=129.9, grace=10)
    assert is_closed(60, MINUTE, watermark=130.0, grace=10)
    assert is_closed(60, MINUTE, watermark=120.0, grace=0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(360, "6m0s"), (0.35, "350ms"), (1.5, "1.5s"), (3723, "1h2m3s"), (-2, "0ms"), (59, "59s")],
)
def test_format_duration_matches_openai_headers(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
