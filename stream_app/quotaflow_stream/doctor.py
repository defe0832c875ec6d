"""``quotaflow doctor``: check a deployment the way an operator would, and say how to fix it.

Checks the broker connection, the topics (present, partitions, compaction on decisions,
retention on usage), the Redis connection, the workers' consumer lag and clock skew (this
machine against Redis and against the workers' heartbeats).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

from quotaflow._kafka import admin as kafka_admin
from quotaflow._kafka import consumer as kafka_consumer
from quotaflow.settings import QuotaflowSettings
from quotaflow.state import HEARTBEAT_KEY, read_heartbeat

Status = Literal["ok", "warn", "fail"]

#: Clock skew beyond this many seconds is a warning (windows and staleness go by clocks).
SKEW_WARN = 1.0
#: The fix for a missing topic, wherever a check finds one.
CREATE_TOPICS = "run `quotaflow topics create` (or start a worker once)"

#: Consumer lag (messages) beyond this is a warning.
LAG_WARN = 10_000


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def run_checks(settings: QuotaflowSettings, timeout: float = 5.0) -> list[Check]:
    checks: list[Check] = []
    admin = _broker(settings, timeout, checks)
    if admin is not None:
        _topics(settings, admin, timeout, checks)
        _lag(settings, timeout, checks)
        _worker_clock(settings, timeout, checks)
    _redis(settings, checks)
    _gateway_salt(settings, checks)
    return checks


def _gateway_salt(settings: QuotaflowSettings, checks: list[Check]) -> None:
    """The shipped HMAC salt gives every installation the same key ids: a failure where the
    gateway would listen beyond loopback (it refuses to start there), a warning elsewhere."""
    g = settings.gateway
    fix = "set QUOTAFLOW_GATEWAY__KEY_SALT to a long random secret, the same fleet-wide"
    if g.salt_problem() is not None:
        detail = f"the default salt, listening on {g.listen_host}"
        checks.append(Check("gateway key salt", "fail", detail, fix))
    elif g.default_salt:
        detail = "the default salt (the gateway starts with it on loopback only)"
        checks.append(Check("gateway key salt", "warn", detail, fix))
    else:
        checks.append(Check("gateway key salt", "ok", "set"))


def _broker(settings: QuotaflowSettings, timeout: float, checks: list[Check]) -> Any:
    from confluent_kafka import KafkaException

    admin = kafka_admin(
        settings.kafka.confluent_config(), socket_connection_setup_timeout_ms=int(timeout * 1000)
    )
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        checks.append(
            Check(
                "broker",
                "fail",
                f"{settings.kafka.bootstrap_servers}: {exc.args[0]}",
                "check QUOTAFLOW_KAFKA__BOOTSTRAP_SERVERS and, with SASL/SSL, "
                "QUOTAFLOW_KAFKA__SECURITY_PROTOCOL, __SASL_* and __SSL_*",
            )
        )
        return None
    checks.append(
        Check("broker", "ok", f"{settings.kafka.bootstrap_servers}: {len(meta.brokers)} broker(s)")
    )
    return admin


def _topics(settings: QuotaflowSettings, admin: Any, timeout: float, checks: list[Check]) -> None:
    from confluent_kafka.admin import ConfigResource

    t = settings.topics
    meta = admin.list_topics(timeout=timeout)
    counts: dict[str, int] = {}
    for name in (t.usage, t.decisions, t.dlq, t.alerts):
        topic = meta.topics.get(name)
        if topic is None or topic.error is not None:
            checks.append(
                Check(
                    f"topic {name}",
                    "fail",
                    "missing",
                    CREATE_TOPICS,
                )
            )
            continue
        counts[name] = len(topic.partitions)
        checks.append(Check(f"topic {name}", "ok", f"{counts[name]} partitions"))
    if t.usage in counts and t.decisions in counts and counts[t.usage] != counts[t.decisions]:
        checks.append(
            Check(
                "partitions",
                "fail",
                f"usage has {counts[t.usage]}, decisions {counts[t.decisions]}",
                "give both topics the same partition count: a key's state must live where its "
                "usage is counted",
            )
        )
    wanted = {t.decisions: ("cleanup.policy", "compact"), t.usage: ("cleanup.policy", "delete")}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, n) for n in wanted if n in counts]
    if not resources:
        return
    try:
        futures = admin.describe_configs(resources, request_timeout=timeout)
        for resource, future in futures.items():
            config = future.result(timeout=timeout)
            key, value = wanted[resource.name]
            entry = config.get(key)
            actual = entry.value if entry is not None else None
            if actual is not None and value not in actual:
                checks.append(
                    Check(
                        f"{resource.name} {key}",
                        "fail",
                        f"is {actual}, should be {value}",
                        f"kafka-configs --alter --entity-type topics --entity-name {resource.name} "
                        f"--add-config {key}={value}",
                    )
                )
            else:
                checks.append(Check(f"{resource.name} {key}", "ok", actual or "(broker default)"))
    except Exception as exc:  # brokers without DescribeConfigs (some dev brokers)
        checks.append(
            Check(
                "topic configs",
                "warn",
                f"cannot read topic configs: {exc}",
                "check them with your broker's tools",
            )
        )


def _lag(settings: QuotaflowSettings, timeout: float, checks: list[Check]) -> None:
    from confluent_kafka import TopicPartition

    group = settings.worker.app_id
    consumer = kafka_consumer(settings.kafka.confluent_config(), group)
    try:
        meta = consumer.list_topics(settings.topics.usage, timeout=timeout)
        topic = meta.topics.get(settings.topics.usage)
        if topic is None or topic.error is not None:
            checks.append(
                Check(
                    "consumer lag",
                    "fail",
                    f"usage topic {settings.topics.usage!r} is missing: nothing to consume",
                    CREATE_TOPICS,
                )
            )
            return
        tps = [TopicPartition(settings.topics.usage, p) for p in topic.partitions]
        committed = consumer.committed(tps, timeout=timeout)
        lag = 0
        unseen = 0
        for tp in committed:
            _, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            if tp.offset < 0:
                unseen += 1
                continue
            lag += max(high - tp.offset, 0)
    except Exception as exc:
        checks.append(Check("consumer lag", "warn", f"cannot read group {group!r}: {exc}"))
        return
    finally:
        consumer.close()
    if unseen == len(tps):
        checks.append(
            Check(
                "consumer lag",
                "warn",
                f"group {group!r} has committed nothing yet",
                "start a worker: `quotaflow worker`",
            )
        )
    elif lag > LAG_WARN:
        checks.append(
            Check(
                "consumer lag",
                "warn",
                f"{lag} messages behind",
                "add workers (up to the partition count) or find what slows them",
            )
        )
    else:
        checks.append(Check("consumer lag", "ok", f"{lag} messages behind"))


def _worker_clock(settings: QuotaflowSettings, timeout: float, checks: list[Check]) -> None:
    """Skew between this machine and the workers, from their newest heartbeat."""
    from confluent_kafka import TopicPartition

    consumer = kafka_consumer(settings.kafka.confluent_config(), "quotaflow-doctor")
    newest: float | None = None
    versions: dict[str, int | None] = {}  # worker -> policy version in its newest heartbeat
    try:
        meta = consumer.list_topics(settings.topics.decisions, timeout=timeout)
        topic = meta.topics.get(settings.topics.decisions)
        if topic is None or topic.error is not None:
            checks.append(
                Check(
                    "worker clock",
                    "fail",
                    f"decisions topic {settings.topics.decisions!r} is missing: no heartbeats",
                    CREATE_TOPICS,
                )
            )
            return
        tps = []
        for p in topic.partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(settings.topics.decisions, p), timeout=timeout
            )
            tps.append(TopicPartition(settings.topics.decisions, p, max(low, high - 50)))
        consumer.assign(tps)
        deadline = time.monotonic() + min(timeout, 3.0)
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            if msg.key() == HEARTBEAT_KEY.encode():
                beat = read_heartbeat(msg.value())
                if beat is None:  # not a heartbeat a worker wrote
                    continue
                skew = time.time() - beat.published_at
                newest = skew if newest is None else min(newest, skew)
                versions[beat.worker] = beat.policy_version
    except Exception as exc:
        checks.append(
            Check(
                "worker clock",
                "warn",
                f"cannot read the workers' heartbeats: {type(exc).__name__}: {exc}",
                "check that the decisions topic is readable with these credentials",
            )
        )
        return
    finally:
        consumer.close()
    if newest is None:
        checks.append(
            Check(
                "worker clock",
                "warn",
                "no recent worker heartbeat",
                "start a worker; SDKs apply their fail mode without one",
            )
        )
    elif abs(newest) > SKEW_WARN + 1.0:  # a heartbeat read back can be up to ~1 s old
        checks.append(
            Check(
                "worker clock",
                "warn",
                f"this machine is {newest:+.1f} s from a worker's clock",
                "run NTP (chrony, systemd-timesyncd) on every host",
            )
        )
    else:
        checks.append(Check("worker clock", "ok", f"within {abs(newest):.2f} s of a worker"))
    _policy_versions(settings, versions, timeout, checks)


def _policy_versions(
    settings: QuotaflowSettings,
    workers: dict[str, int | None],
    timeout: float,
    checks: list[Check],
) -> None:
    """Whether every worker enforces the live policy version (from their heartbeats)."""
    from quotaflow.policy_topic import read_log

    try:
        live = read_log(settings, timeout).current
    except Exception as exc:
        checks.append(Check("policy version", "warn", f"cannot read the policies topic: {exc}",
                            CREATE_TOPICS))  # fmt: skip
        return
    want = live.version if live is not None else None
    shown = {w: ("file" if v is None else f"v{v}") for w, v in sorted(workers.items())}
    behind = {w: v for w, v in workers.items() if v != want}
    if behind:
        checks.append(Check(
            "policy version", "warn",
            f"live version is {want or 'none (the file)'}; workers on "
            + ", ".join(f"{w}: {shown[w]}" for w in behind),
            "a worker that cannot read the policies topic keeps its version: check its log",
        ))  # fmt: skip
    else:
        where = f"v{want}" if want is not None else "the policy file (no live version)"
        checks.append(Check("policy version", "ok", f"{len(workers)} workers on {where}"))


def _redis(settings: QuotaflowSettings, checks: list[Check]) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis.url, **settings.redis.client_kwargs())
    try:
        before = time.time()
        seconds, micros = cast(tuple[int, int], client.time())
        after = time.time()
        skew = (before + after) / 2 - (seconds + micros / 1e6)
        checks.append(Check("redis", "ok", _redacted_url(settings.redis.url)))
        status: Status = "ok" if abs(skew) <= SKEW_WARN else "warn"
        checks.append(
            Check(
                "clock vs redis",
                status,
                f"{skew:+.3f} s",
                "" if status == "ok" else "run NTP on every host",
            )
        )
    except redis.AuthenticationError:
        checks.append(
            Check(
                "redis",
                "fail",
                "authentication failed",
                "set QUOTAFLOW_REDIS__PASSWORD to the server's password",
            )
        )
    except redis.RedisError as exc:
        checks.append(
            Check(
                "redis",
                "fail",
                f"{_redacted_url(settings.redis.url)}: {exc}",
                "check QUOTAFLOW_REDIS__URL (rediss:// for TLS) and that Redis runs; "
                "workers keep aggregating without it, SDKs read the topic instead",
            )
        )
    finally:
        client.close()


def _redacted_url(url: str) -> str:
    """A Redis URL without its password, for output."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def render(checks: list[Check]) -> str:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = []
    for c in checks:
        lines.append(f"[{marks[c.status]}] {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"       fix: {c.fix}")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> str:
    return json.dumps([asdict(c) for c in checks], indent=2)
