"""The served run's timeline from scripts/serve_trace's files: for each client run, how long
before the core's first step, the core's span and busy time, how far the front end's handling of
each step trailed the core's end of it, and how long after the core's last output the client
finished.

    python scripts/serve_trace/report.py DIR
"""

from __future__ import annotations

import glob
import sys


def _rows(pattern: str) -> list[list[float]]:
    paths = glob.glob(pattern)
    if len(paths) != 1:
        raise SystemExit(f"{pattern}: expected one file, found {len(paths)} (one server per folder)")
    return [[float(x) for x in line.split("\t")] for line in open(paths[0]) if line.strip()]


def main(folder: str) -> None:
    core, front_end = _rows(f"{folder}/trace_*.tsv"), _rows(f"{folder}/fe_*.tsv")
    runs = _rows(f"{folder}/client.tsv")
    for start, end in runs:
        steps = [i for i, row in enumerate(core) if start <= row[0] <= end]
        work = [core[i] for i in steps if core[i][3] > 0]
        if not work:
            continue
        first, last = work[0][0], work[-1][1]
        busy = sum(row[1] - row[0] for row in work)
        lags = sorted(front_end[i][0] - core[i][1] for i in steps if i < len(front_end))
        pick = lambda q: 1e3 * lags[min(len(lags) - 1, int(q * len(lags)))]  # noqa: E731
        print(f"client run {end - start:.2f} s: to the core's first step {1e3 * (first - start):.0f} ms; core span "
              f"{last - first:.2f} s ({busy:.2f} s in steps, {len(work)} steps); after its last output "
              f"{1e3 * (end - last):.0f} ms")
        print(f"   front end behind the core: p50 {pick(0.5):.0f} ms, p90 {pick(0.9):.0f} ms, max {pick(0.999):.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
