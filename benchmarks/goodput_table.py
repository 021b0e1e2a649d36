"""Goodput table of a serving sweep (e2e_serve_sweep.py's summary rows): per kv-cache dtype
and arrival rate, requests per second that met every latency objective, with the p99s behind
it, and the highest rate each dtype served with all its requests inside the objectives.

    python benchmarks/goodput_table.py e2e_serve_summary.json [more.json ...]"""
from __future__ import annotations

import argparse
import json


def rate_key(rate) -> float:
    return float("inf") if str(rate) == "inf" else float(rate)


def met_all(row: dict) -> bool:
    """Every request inside the objectives: goodput equals the completed request rate."""
    done, good = row.get("requests_per_s"), row.get("goodput_req_s")
    return bool(good) and done is not None and good >= 0.999 * done


def table(rows: list[dict]) -> str:
    rows = [r for r in rows if "goodput_req_s" in r and "error" not in r]
    if not rows:
        raise SystemExit("no rows with goodput (run e2e_serve_sweep.py with --slo)")
    kvs = list(dict.fromkeys(r["kv"] for r in rows))
    rates = sorted({str(r["rate"]) for r in rows}, key=rate_key)
    by = {(r["kv"], str(r["rate"])): r for r in rows}
    slo = rows[0].get("slo", "")
    out = [f"Goodput, requests/s inside `{slo}` (ms) [p99 TTFT s / p99 TPOT ms]:", "",
           "| rate (req/s) | " + " | ".join(kvs) + " |", "|---|" + "---|" * len(kvs)]
    for rate in rates:
        cells = []
        for kv in kvs:
            r = by.get((kv, rate))
            cells.append("-" if r is None else
                         f"{r['goodput_req_s'] or 0:.2f} [{(r['p99_ttft_ms'] or 0) / 1e3:.1f} / "
                         f"{r['p99_tpot_ms'] or 0:.0f}]")
        out.append(f"| {rate} | " + " | ".join(cells) + " |")
    best = []
    for kv in kvs:
        ok = [rate for rate in rates if (kv, rate) in by and met_all(by[(kv, rate)])]
        best.append(max(ok, key=rate_key) if ok else "none")
    out.append("| highest rate with every request inside | " + " | ".join(best) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("summaries", nargs="+")
    a = p.parse_args()
    print(table([r for f in a.summaries for r in json.load(open(f))]))


if __name__ == "__main__":
    main()
