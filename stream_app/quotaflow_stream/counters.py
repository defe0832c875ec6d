"""What a worker has done, for ``/api/stats``, ``/metrics`` and the demo's summary."""

from __future__ import annotations

import time
from typing import Any


class Counters:
    """Plain counters the pipeline, the publisher and the dead letters add to."""

    def __init__(self) -> None:
        self.messages = 0
        self.records = 0
        self.dlq = 0
        self.late = 0
        self.duplicates = 0
        self.forwarded = 0
        self.states_published = 0
        self.heartbeats = 0
        self.alerts = 0
        self.started_at = time.time()
        #: Wall-clock time of the first and latest aggregated record (throughput = records
        #: over their difference, worker start-up excluded).
        self.first_record_at: float | None = None
        self.last_record_at: float | None = None
        #: CPU-side seconds spent decoding and folding messages, saving entries to the
        #: changelog and publishing states: where a busy worker's time goes.
        self.seconds_folding = 0.0
        self.seconds_saving = 0.0
        self.seconds_publishing = 0.0
        #: Seconds in the cycle collector, wherever it ran (see worker.time_collections).
        self.seconds_collecting = 0.0
        #: The three above as they stood when the latest record was folded: the shares of
        #: the span that throughput is measured over (publication goes on after it).
        self.at_last_record: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))
