"""Rows of benchmarks/results/tp.json (issue 23) from one forced-demotion run at a tensor
parallel size (gpu_session.sh's tp2 / tp_ray stages): e2e_compare's summary of auto and mikv
(mikv's greedy tokens against auto's at the same TP size) and the mikv engine's log, whose
workers report every demotion they check under MIKV_VERIFY_DEMOTIONS=1 (a WARNING line for a
page that broke the format's bound or changed later).

    python benchmarks/tp_rows.py OUT_DIR TAG --tp 2 --executor ray [--device NAME]

prints the rows as a JSON list. A run with the self-check on synchronizes the GPU every step:
its total_tok_s is kept, with "verify": true, but is not a throughput measurement."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re

VERIFY = re.compile(r"\b(INFO|WARNING)\b.*mikv verify:")


def verify_counts(log_text: str) -> tuple[int, int]:
    """(reports, warnings) among the workers' "mikv verify" lines."""
    levels = [m.group(1) for m in map(VERIFY.search, log_text.splitlines()) if m]
    return len(levels), levels.count("WARNING")


def read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        return f.read()


def tp_rows(summary: list[dict], mikv_log: str | None, tp: int, executor: str,
            device: str | None = None) -> list[dict]:
    reports, warnings = verify_counts(mikv_log) if mikv_log is not None else (0, 0)
    rows = []
    for r in summary:
        match = 1.0 if r["kv"] == "auto" else (r.get("greedy_vs_auto") or {}).get(
            "token_match_rate")
        mikv = r["kv"] == "mikv"
        rows.append({
            "tp": tp, "executor": executor, "kv": r["kv"],
            "workload": r.get("workload"), "knobs": r.get("knobs"),
            "token_match_vs_auto": match,
            "verify": bool(mikv and reports),
            "verify_reports": reports if mikv else None,
            "verify_warnings": warnings if mikv else None,
            "demotions": r.get("demotions"),
            "kv_tokens": r.get("kv_tokens"), "total_tok_s": r.get("total_tok_s"),
            "preemptions": r.get("preemptions"), "device": device,
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("tag", help="e2e_compare's --tag of the run, e.g. tp2_ray_forced")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--executor", required=True, help="vLLM's distributed executor: ray, mp, uni")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    with open(os.path.join(a.out_dir, f"e2e_summary_{a.tag}.json")) as f:
        summary = json.load(f)
    plain = os.path.join(a.out_dir, f"e2e_mikv_{a.tag}.log")
    log = next((path for path in (plain, plain + ".gz") if os.path.exists(path)), None)
    rows = tp_rows(summary, read_text(log) if log else None, a.tp, a.executor, a.device)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
