"""``quotaflow bench gateway|check|propagation|stream``: each figure beside its baseline,
measured in the same run on the embedded stack, printed as JSON. One module per bench:

- :mod:`.gateway`: the latency the gateway adds, against direct calls to the same upstream
  (alternating, so machine noise hits both alike).
- :mod:`.check`: ``QuotaClient.check()`` with 10k keys cached and a running follower, against
  the ``limits`` library's moving-window limiter on Redis (the same Valkey); ``record()`` with
  the broker up and unreachable; resident memory per cached key and per worker key-window
  (:mod:`.memory`, in fresh processes).
- :mod:`.propagation`: a call's usage to the state counting it in every follower of a quiet
  fleet, in its two stages, against the broker's own floor on the same two hops.
- :mod:`.stream`: records one worker aggregates per second from messages the SDK's emitter
  packed, against a naive Faust worker (one record per message, one table update per record:
  :mod:`.naive_worker`), both counts verified exact.

Shared machines are noisy: latencies are medians over rounds, and ratios are what to compare."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    from quotaflow_producers.bench.check import run_check
    from quotaflow_producers.bench.gateway import run_gateway
    from quotaflow_producers.bench.propagation import run_propagation
    from quotaflow_producers.bench.stream import run_stream

    p = sub.add_parser("bench", help="benchmarks with their baselines, as JSON")
    bench = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bench.required = True
    gw = bench.add_parser("gateway", help="latency the gateway adds over direct upstream calls")
    gw.add_argument("--requests", type=int, default=500, help="requests per path (500)")
    gw.add_argument(
        "--route", choices=("chat", "responses", "messages", "images"), default="chat",
        help="the API measured (chat completions, Responses, Anthropic Messages, images)",
    )  # fmt: skip
    gw.add_argument("--stream", action="store_true", help="streamed calls")
    gw.add_argument(
        "--concurrency", type=int, default=1, metavar="C",
        help="connections at once: >1 measures requests/s and latency under load, the upstream "
        "and the gateway each in a process of their own (default 1: added latency per call)",
    )  # fmt: skip
    gw.add_argument("--rounds", type=int, default=3, help="rounds per path under load (3)")
    gw.add_argument(
        "--gateway-processes", type=int, default=1, metavar="N",
        help="under load, the gateway as N processes on one port (gateway --processes N)",
    )  # fmt: skip
    gw.add_argument("--json", action="store_true", help="print JSON only")
    gw.set_defaults(func=run_gateway)
    chk = bench.add_parser("check", help="check()/record() latency vs the limits library")
    chk.add_argument("--keys", type=int, default=10_000, help="keys in the cache (10000)")
    chk.add_argument("--samples", type=int, default=100_000, help="checks per round (100000)")
    chk.add_argument("--rounds", type=int, default=5)
    chk.add_argument("--memory-keys", type=int, default=100_000,
                     help="keys in the SDK's memory probe, 10x as many key-windows in the "
                          "worker's (100000)")  # fmt: skip
    chk.add_argument("--json", action="store_true", help="print JSON only")
    chk.set_defaults(func=run_check)
    pr = bench.add_parser("propagation", help="a call's usage to every follower's state")
    pr.add_argument("--calls", type=int, default=300, help="calls recorded (300)")
    pr.add_argument("--followers", type=int, default=4, help="instances following (4)")
    pr.add_argument("--seed", type=int, default=1, help="seed of the gaps between calls")
    pr.add_argument("--json", action="store_true", help="print JSON only")
    pr.set_defaults(func=run_propagation)
    st = bench.add_parser("stream", help="worker records/s: packed vs one record per message")
    st.add_argument("--records", type=int, default=200_000, help="records to preload (200000)")
    st.add_argument("--keys", type=int, default=10_000)
    st.add_argument(
        "--baseline-records",
        type=int,
        default=20_000,
        help="records for the naive run (it is slow; the rate is what compares)",
    )
    st.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="N > 1: the aggregate records/s of N workers in one group, and the scaling "
        "efficiency against one worker, on the same records (counts verified)",
    )  # fmt: skip
    st.add_argument("--json", action="store_true", help="print JSON only")
    st.set_defaults(func=run_stream)
