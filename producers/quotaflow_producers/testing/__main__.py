"""``python -m quotaflow_producers.testing [PORT]``: the local provider-like upstream in a process
of its own (for load benches: the client and the gateway do not share its interpreter). Prints
its port, then serves until stopped."""

from __future__ import annotations

import signal
import sys
import threading

from quotaflow_producers.testing.upstream import OpenAIStub


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    stub = OpenAIStub(port=port).start()
    print(stub.port, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    stub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
