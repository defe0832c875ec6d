"""The audit trail: read back the usage topic, exactly once per record id, and check the
worker's aggregates against it.

The usage topic holds every record any producer sent, including duplicates (retries, replays)
and the copies the worker forwards from a wrong partition. Reading it back therefore keeps the
first record of each id, and leaves out what the worker leaves out too: records more than
``max_future_skew`` ahead of the time their message was appended (they went to the DLQ).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, cast

from quotaflow._exceptions import ConfigError
from quotaflow.messages import parse_usage_value
from quotaflow.prices import PriceTable, dollars
from quotaflow.record import EXPORT_ONLY_COLUMNS, WireRecord
from quotaflow.settings import QuotaflowSettings

#: The counted units of a usage record, as totals sum them (cost last, in micro-dollars).
UNITS = (
    "requests", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
    "cache_write_tokens", "reasoning_tokens", "images", "cost_micros",
)  # fmt: skip

#: Columns of query and export output, in order.
COLUMNS = (
    "id", "time", "ts", "key", "model", *UNITS, "cost_usd", "price_version", "priced_by",
    "priced_as", "provider", "user", "status", "estimated", "source",
)  # fmt: skip
assert set(EXPORT_ONLY_COLUMNS) <= set(COLUMNS)

WINDOWS = {"hour": 3600, "day": 86400}
GROUP_FIELDS = ("key", "model", "source", "status")

_RELATIVE = re.compile(r"-?(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now: float | None = None) -> float:
    """Epoch seconds from ``2026-11-22T08:00:00Z``, ``1763798400``, ``now``, or a time ago:
    ``15m``, ``2h``, ``1d`` (``-15m`` too, written ``--from=-15m`` on a command line)."""
    now = time.time() if now is None else now
    text = text.strip()
    if text == "now":
        return now
    if m := _RELATIVE.fullmatch(text):
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"not a time: {text!r} (use ISO 8601 like 2026-11-22T08:00:00Z, epoch seconds, "
            "'now' or a time ago like 15m, 2h, 1d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class ScanStats:
    """What a scan read: messages, records, and what it left out."""

    messages: int = 0
    records: int = 0
    duplicates: int = 0
    invalid: int = 0
    future: int = 0
    partitions: dict[int, tuple[int, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "records": self.records,
            "duplicates": self.duplicates,
            "invalid": self.invalid,
            "future": self.future,
        }


Progress = Callable[[int, int], None]


def scan_usage(
    settings: QuotaflowSettings,
    stats: ScanStats | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    idle: float = 1.0,
) -> Iterator[WireRecord]:
    """Every record in the usage topic up to its end, once per id.

    The end is each partition's high watermark when the scan starts, and then no message for
    ``idle`` seconds: some brokers (Tansu) report watermarks below the last offset, so the
    watermark alone would stop short. ``progress(done, total)`` is called as messages are read.
    Raises ``ConfigError`` if the topic does not exist, ``BrokerUnavailable`` if the broker
    cannot be reached within ``timeout`` seconds.
    """
    from confluent_kafka import TopicPartition

    from quotaflow._kafka import consumer as kafka_consumer
    from quotaflow._kafka import kafka_errors

    stats = stats if stats is not None else ScanStats()
    topic = settings.topics.usage
    consumer = kafka_consumer(
        settings.kafka.confluent_config(), "quotaflow-audit", enable_partition_eof=False
    )
    try:
        with kafka_errors(f"reading {topic!r}", settings.kafka.bootstrap_servers):
            meta = consumer.list_topics(topic, timeout=timeout)
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise ConfigError(f"usage topic {topic!r} does not exist on the broker")
        ends: dict[int, int] = {}
        starts = []
        for p in sorted(tmeta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            stats.partitions[p] = (low, high)
            if high > low:
                ends[p] = high
                starts.append(TopicPartition(topic, p, low))
        total = sum(high - low for low, high in stats.partitions.values())
        done = 0
        if progress:
            progress(done, total)
        if not starts:
            return
        consumer.assign(starts)
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while ends or time.monotonic() - quiet_since < idle:
            batch = consumer.consume(num_messages=1000, timeout=min(idle, 0.5))
            if not batch:
                if ends and time.monotonic() > deadline:
                    raise ConfigError(f"reading {topic!r} stalled: no message for {timeout:.0f}s")
                continue
            deadline = quiet_since = time.monotonic()
            deadline += timeout
            for msg in batch:
                if msg.error() is not None:
                    continue
                p, offset = msg.partition() or 0, msg.offset() or 0
                end = ends.get(p)
                if end is not None and offset >= end - 1:
                    del ends[p]
                done += 1
                total = max(total, done)
                stats.messages += 1
                yield from _unique(msg, seen, stats, settings.worker.max_future_skew)
            if progress:
                progress(done, total)
    finally:
        consumer.close()


def _unique(msg: Any, seen: set[str], stats: ScanStats, skew: float) -> Iterator[WireRecord]:
    records, rejected = parse_usage_value(msg.value())
    stats.invalid += len(rejected)
    kind, appended_ms = msg.timestamp()
    appended = appended_ms / 1000 if kind and appended_ms > 0 else None
    for r in records:
        if appended is not None and r.ts > appended + skew:
            stats.future += 1  # the worker sent it to the DLQ
            continue
        if r.id in seen:
            stats.duplicates += 1
            continue
        seen.add(r.id)
        stats.records += 1
        yield r


def matching(
    records: Iterable[WireRecord],
    *,
    key: str | None = None,
    model: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Iterator[WireRecord]:
    for r in records:
        if key is not None and r.key != key:
            continue
        if model is not None and r.model != model:
            continue
        if since is not None and r.ts < since:
            continue
        if until is not None and r.ts >= until:
            continue
        yield r


def cost_of(r: WireRecord, prices: PriceTable) -> tuple[int | None, str | None, str]:
    """A record's cost, the table version that priced it, and who priced it: the producer
    (``record``), this audit from the same table (``audit``: a v1 record, or one its producer
    could not price), or nobody (``unpriced``: cost None)."""
    if r.cost_micros is not None:
        return r.cost_micros, r.price_version, "record"
    cost = prices.record_cost(r)
    if cost is None:
        return None, None, "unpriced"
    return cost, prices.version, "audit"


def row(r: WireRecord, prices: PriceTable) -> dict[str, Any]:
    cost, version, priced_by = cost_of(r, prices)
    return {
        "id": r.id,
        "time": iso(r.ts),
        "ts": r.ts,
        "key": r.key,
        "model": r.model,
        **{unit: getattr(r, unit) for unit in UNITS[:-1]},
        "cost_micros": cost,
        "cost_usd": dollars(cost),
        "price_version": version,
        "priced_by": priced_by,
        "priced_as": r.priced_as,
        "provider": r.provider,
        "user": r.user,
        "status": r.status,
        "estimated": r.estimated,
        "source": r.source,
    }


#: records, then each of UNITS (cost of the priced records), then how many are unpriced
Sums = list[int]
#: What totals lists per group, in the order of Sums.
TOTALS = ("records", *UNITS, "unpriced")


def totals(
    records: Iterable[WireRecord], by: tuple[str, ...], window: str | None, prices: PriceTable
) -> dict[tuple[Any, ...], Sums]:
    """Sums (see :data:`TOTALS`) grouped by the ``by`` fields and, with ``window``, by UTC
    hour or day. Money is summed as integer micro-dollars."""
    size = WINDOWS[window] if window else None
    out: dict[tuple[Any, ...], Sums] = {}
    counted = UNITS[:-1]
    for r in records:
        group = tuple(getattr(r, f) for f in by)
        if size is not None:
            group = (iso(int(r.ts // size) * size), *group)
        sums = out.get(group)
        if sums is None:
            sums = out[group] = [0] * len(TOTALS)
        sums[0] += 1
        for i, unit in enumerate(counted, 1):
            sums[i] += getattr(r, unit)
        cost = cost_of(r, prices)[0]
        if cost is None:
            sums[-1] += 1
        else:
            sums[-2] += cost
    return out


def write_rows(
    rows: Iterable[dict[str, Any]], fmt: str, out: IO[str], columns: tuple[str, ...]
) -> int:
    """Write rows as ``csv`` or ``jsonl``; returns how many."""
    n = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
            n += 1
    elif fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r, separators=(",", ":")) + "\n")
            n += 1
    else:
        raise ConfigError(f"unknown format {fmt!r}: use csv or jsonl")
    return n


def write_parquet(rows: Iterable[dict[str, Any]], path: str, columns: tuple[str, ...]) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "Parquet export needs the parquet extra: pip install 'quotaflow[parquet]'"
        ) from None
    data: dict[str, list[Any]] = {c: [] for c in columns}
    for r in rows:
        for c in columns:
            data[c].append(r[c])
    pq.write_table(pa.table(data), path)
    return len(data[columns[0]])


def render_table(rows: list[dict[str, Any]], columns: tuple[str, ...], title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r[c]) for c in columns))
    buf = io.StringIO()
    Console(file=buf, width=200).print(table)
    return buf.getvalue()


# -- reconcile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    key: str
    where: str  # "worker" or "snapshot"
    field: str
    recount: int
    aggregated: int | None

    def __str__(self) -> str:
        got = "missing" if self.aggregated is None else str(self.aggregated)
        return f"{self.key}: {self.where} {self.field} = {got}, the topic says {self.recount}"


#: What reconcile compares: the totals the worker keeps per key (every unit, and the cost),
#: and where each is in Sums.
FIELDS = ("records", *UNITS)
_RECOUNT_INDEX = tuple(TOTALS.index(name) for name in FIELDS)


def compare(
    recount: dict[str, Sums], aggregated: dict[str, Sums | None], where: str
) -> list[Difference]:
    """Every field of every key where ``aggregated`` differs from the topic's recount."""
    diffs = []
    for key in sorted(set(recount) | {k for k, v in aggregated.items() if v is not None}):
        want = recount.get(key)
        got = aggregated.get(key)
        for i, name in enumerate(FIELDS):
            wanted = want[_RECOUNT_INDEX[i]] if want is not None else 0
            if got is None or got[i] != wanted:
                diffs.append(Difference(key, where, name, wanted, None if got is None else got[i]))
                if got is None:
                    break
    return diffs


def _sums(state: Any) -> Sums:
    t = state.totals
    return [getattr(t, name) for name in FIELDS]


def snapshot_totals(settings: QuotaflowSettings) -> dict[str, Sums | None]:
    """Lifetime totals per key from the Redis snapshot."""
    import redis

    from quotaflow.state import QuotaState

    client = redis.Redis.from_url(settings.redis.url, **settings.redis.client_kwargs())
    try:
        raw = cast(dict[bytes, bytes], client.hgetall(settings.redis.states_hash))
    except redis.RedisError as exc:
        raise ConfigError(f"cannot read the Redis snapshot: {exc}") from None
    finally:
        client.close()
    out: dict[str, Sums | None] = {}
    for key, value in raw.items():
        state = QuotaState.from_json(value)
        out[key.decode() if isinstance(key, bytes) else key] = _sums(state)
    return out


def worker_totals(
    base_url: str, keys: Iterable[str], headers: dict[str, str], timeout: float = 5.0
) -> dict[str, Sums | None]:
    """Lifetime totals per key from a worker's ``/api/keys/{key}`` (None where it has none)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from quotaflow.state import QuotaState

    out: dict[str, Sums | None] = {}
    for key in keys:
        url = f"{base_url}/api/keys/{urllib.parse.quote(key, safe='')}"
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                out[key] = _sums(QuotaState.from_json(resp.read()))
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise ConfigError(f"worker API {url}: HTTP {exc.code}") from None
            out[key] = None
        except OSError as exc:
            raise ConfigError(f"worker API unreachable at {base_url}: {exc}") from None
    return out
