"""quotaflow: streaming quota enforcement for LLM usage across service fleets.

The public surface lives here; modules are implementation detail and may move.
"""

from quotaflow._exceptions import (
    BrokerError,
    BrokerUnavailable,
    ClientStateError,
    ConfigError,
    DeliveryFailed,
    QuotaExceeded,
    QuotaflowError,
    RecordError,
    TransportFull,
    UnpricedModel,
)
from quotaflow.billed import BilledUsage, billed_usage
from quotaflow.cache import QuotaCache
from quotaflow.client import ClientState, QuotaClient
from quotaflow.decision import Decision
from quotaflow.emitter import UsageEmitter
from quotaflow.keys import key_id
from quotaflow.messages import parse_usage_value
from quotaflow.partitioner import murmur2, partition_for
from quotaflow.policies import Binding, Limits, LimitSpec, Policy, PolicySet, load_policies
from quotaflow.prices import ModelPrices, PriceTable, load_price_table
from quotaflow.record import RecordedUsage, UsageRecord, WireRecord, usage_record_json_schema
from quotaflow.reservation import Reservation
from quotaflow.settings import QuotaflowSettings, load_settings
from quotaflow.state import QuotaState
from quotaflow.streaming import StreamUsage
from quotaflow.tokens import TokenCount, count_chat_prompt, count_inputs, count_request
from quotaflow.transports import KafkaTransport, MemoryTransport, Transport

__version__ = "0.1.0"

__all__ = [
    "BilledUsage",
    "Binding",
    "BrokerError",
    "BrokerUnavailable",
    "ClientState",
    "ClientStateError",
    "ConfigError",
    "Decision",
    "DeliveryFailed",
    "KafkaTransport",
    "LimitSpec",
    "Limits",
    "MemoryTransport",
    "ModelPrices",
    "Policy",
    "PolicySet",
    "PriceTable",
    "QuotaCache",
    "QuotaClient",
    "QuotaExceeded",
    "QuotaState",
    "QuotaflowError",
    "QuotaflowSettings",
    "RecordError",
    "RecordedUsage",
    "Reservation",
    "StreamUsage",
    "TokenCount",
    "Transport",
    "TransportFull",
    "UnpricedModel",
    "UsageEmitter",
    "UsageRecord",
    "WireRecord",
    "__version__",
    "billed_usage",
    "count_chat_prompt",
    "count_inputs",
    "count_request",
    "key_id",
    "load_policies",
    "load_price_table",
    "load_settings",
    "murmur2",
    "parse_usage_value",
    "partition_for",
    "usage_record_json_schema",
]
