import pytest

from quotaflow.partitioner import murmur2, partition_for


# Vectors from Apache Kafka's UtilsTest.testMurmur2 (signed 32-bit results).
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ("abc", 479470107),
    ],
)
def test_murmur2_matches_kafka(text: str, expected: int) -> None:
    value = murmur2(text.encode())
    signed = value - (1 << 32) if value >= 1 << 31 else value
    assert signed == expected


def test_partition_is_stable_and_in_range() -> None:
    parts = {partition_for(f"key-{i}".encode(), 8) for i in range(1000)}
    assert parts == set(range(8))
    assert partition_for(b"team-alpha", 8) == partition_for(b"team-alpha", 8)


def test_partition_of_a_key_is_partition_for_its_bytes() -> None:
    from quotaflow.partitioner import partition_for, partition_of

    for key in ["tenant-1", "fault-0", "ü-key", "x" * 300]:
        for parts in (1, 4, 8, 12):
            assert partition_of(key, parts) == partition_for(key.encode(), parts)
