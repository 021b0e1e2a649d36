"""The serving sweep's goodput: the objectives reach `vllm bench serve` in a form its own parser
accepts, and the table names the highest rate each kv dtype served inside them."""
from __future__ import annotations

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import e2e_serve_sweep  # noqa: E402
import goodput_table  # noqa: E402


def sweep_args(**over) -> argparse.Namespace:
    a = dict(model="m", tokenizer="t", port=8200, input_len=4096, output_len=1024,
             num_prompts=128, out_dir="/tmp/x", slo=["ttft:3000", "tpot:50"])
    return argparse.Namespace(**{**a, **over})


def parsed_by_vllm(**over) -> argparse.Namespace:
    """Our `vllm bench serve` arguments at 4 req/s, seed 2, through vLLM's own parser."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser.parse_args(e2e_serve_sweep.bench_args("4", 2, "r.json", sweep_args(**over)))


def test_objectives_parse_with_vllms_bench_serve_parser():
    from vllm.benchmarks.serve import check_goodput_args

    args = parsed_by_vllm()
    assert check_goodput_args(args) == {"ttft": 3000.0, "tpot": 50.0}
    assert {"ttft", "tpot", "e2el"} <= set(args.percentile_metrics.split(","))
    assert args.request_rate == 4.0 and args.seed == 2 and args.ignore_eos


def test_a_bad_objective_is_refused_by_vllm():
    from vllm.benchmarks.serve import check_goodput_args

    args = parsed_by_vllm(slo=["ttfb:3000"])
    with pytest.raises(ValueError, match="ttfb"):
        check_goodput_args(args)


def row(kv, rate, goodput, done, ttft=1000.0, tpot=30.0):
    return {"kv": kv, "rate": rate, "slo": "ttft:3000 tpot:50", "goodput_req_s": goodput,
            "requests_per_s": done, "p99_ttft_ms": ttft, "p99_tpot_ms": tpot}


def test_table_names_the_highest_rate_served_inside_the_objectives():
    rows = [row("fp8", "2", 1.9, 1.9), row("fp8", "4", 2.1, 3.6, ttft=9000),
            row("mikv", "2", 1.9, 1.9), row("mikv", "4", 3.7, 3.7), row("mikv", "inf", 4.0, 6.0),
            row("auto", "2", 0.5, 1.8, ttft=12000), {"kv": "int4", "error": "timeout"}]
    text = goodput_table.table(rows)
    assert "| 4 | 2.10 [9.0 / 30] | 3.70 [1.0 / 30] | - |" in text
    assert text.splitlines()[-1] == "| highest rate with every request inside | 2 | 4 | none |"


def test_table_refuses_rows_without_goodput():
    with pytest.raises(SystemExit, match="--slo"):
        goodput_table.table([{"kv": "auto", "total_tok_s": 1.0}])
