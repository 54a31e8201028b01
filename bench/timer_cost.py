"""Cost of one per-request deadline (`call_later` then `cancel`) with N other timers pending.

    python -m bench.timer_cost [--pending 0,100,1000,5000,50000]

An idle keep-alive connection holds one pending timer (its idle deadline); a request schedules
and cancels about one. This is the timer heap's share of the idle-connection curve
(docs/performance.md, Cost curves), under uvloop and under asyncio's own loop. CPU time, best
of 3 runs of 200,000 deadlines each; run it pinned (`taskset -c 0`) on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import uvloop

DEADLINES = 200_000
YIELD_EVERY = 64  # let the loop run an iteration now and then, as a server's loop does


def _noop() -> None:
    pass


async def per_deadline_ns(pending: int) -> float:
    loop = asyncio.get_running_loop()
    idle = [loop.call_later(3600 + i / 1000, _noop) for i in range(pending)]
    started = time.process_time()
    for i in range(DEADLINES):
        loop.call_later(10.0, _noop).cancel()
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    elapsed = time.process_time() - started
    for handle in idle:
        handle.cancel()
    return elapsed / DEADLINES * 1e9


LOOPS: dict[str, Callable[[Coroutine[Any, Any, float]], float]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", default="0,100,1000,5000,50000")
    args = parser.parse_args(argv)
    print("| pending timers | " + " | ".join(LOOPS) + " |")
    print("|---:|" + "---:|" * len(LOOPS))
    for pending in (int(n) for n in args.pending.split(",")):
        cells = [
            f"{min(run(per_deadline_ns(pending)) for _ in range(3)):,.0f} ns"
            for run in LOOPS.values()
        ]
        print(f"| {pending:,} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
