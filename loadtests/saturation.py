"""Read locust's *_stats_history.csv from a step load and report the saturation point.

    python loadtests/saturation.py results/step_stats_history.csv

For each user count, the median requests/s over the second half of its step (the first half
is ramp-up); saturation is the first step whose throughput is within 5% of the best seen.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict


def steps(path: str) -> dict[int, dict[str, float]]:
    rows = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated" and row["User Count"] != "0" and row["Requests/s"] not in ("", "N/A"):
                rows[int(row["User Count"])].append(row)
    out = {}
    for users, rs in sorted(rows.items()):
        tail = rs[len(rs) // 2 :] or rs
        p95 = [float(r["95%"]) for r in tail if r["95%"] not in ("", "N/A")]
        out[users] = {
            "rps": statistics.median(float(r["Requests/s"]) for r in tail),
            "p95_ms": statistics.median(p95) if p95 else float("nan"),
        }
    return out


def main(path: str) -> int:
    table = steps(path)
    if not table:
        print("no aggregated rows in", path)
        return 1
    best = max(v["rps"] for v in table.values())
    saturated = next(u for u, v in table.items() if v["rps"] >= 0.95 * best)
    print("users  req/s   p95 ms")
    for users, v in table.items():
        mark = "  <- saturation" if users == saturated else ""
        print(f"{users:5d}  {v['rps']:6.1f}  {v['p95_ms']:6.0f}{mark}")
    print(f"saturation: {saturated} users, {table[saturated]['rps']:.0f} req/s (best {best:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
