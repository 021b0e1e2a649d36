"""tp.json's rows (issue 23): the verify counts come from the demotion self-check's own log lines
as vLLM's logger formats them, and a lost warning would read as a clean run."""
from __future__ import annotations

import io
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import tp_rows  # noqa: E402

from mikv_vllm import verify  # noqa: E402


def vllm_formatted(emit) -> str:
    """What `emit()` logs through mikv's logger, in vLLM's own log format."""
    import vllm.logger  # noqa: F401  (configures the "vllm" logger and its handler)

    vllm_logger = logging.getLogger("vllm")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(vllm_logger.handlers[0].formatter)
    vllm_logger.addHandler(handler)
    try:
        emit()
    finally:
        vllm_logger.removeHandler(handler)
    return out.getvalue()


def test_verify_reports_and_warnings_are_counted_from_vllm_log_lines():
    log = vllm_formatted(lambda: (
        verify.logger.info("mikv verify: %d moves, worst error / the format's bound: K %.3f", 3, .5),
        verify.logger.warning("mikv verify: %d of %d demoted pages changed since their demotion",
                              1, 9),
        logging.getLogger("vllm").warning("an unrelated warning")))
    assert tp_rows.verify_counts(log) == (2, 1)


def test_rows_carry_the_greedy_match_and_mark_verified_runs():
    summary = [
        {"kv": "auto", "workload": "64x(2048+128)", "kv_tokens": 100, "total_tok_s": 10.0,
         "preemptions": 0, "demotions": 0},
        {"kv": "mikv", "workload": "64x(2048+128)", "kv_tokens": 100, "total_tok_s": 1.0,
         "preemptions": 0, "demotions": 7, "knobs": '{"hi_budget":0.1}',
         "greedy_vs_auto": {"identical_sequences": "15/16", "token_match_rate": 0.97}},
    ]
    log = "(Worker pid=1) INFO 12-07 13:05:40 [verify.py:96] mikv verify: 54 moves, ...\n"
    auto, mikv = tp_rows.tp_rows(summary, log, 2, "ray", "H200")
    assert (auto["token_match_vs_auto"], auto["verify"], auto["verify_warnings"]) == (1.0, False,
                                                                                     None)
    assert mikv["token_match_vs_auto"] == 0.97
    assert (mikv["verify"], mikv["verify_reports"], mikv["verify_warnings"]) == (True, 1, 0)
    assert (mikv["tp"], mikv["executor"], mikv["device"]) == (2, "ray", "H200")
    # Without the self-check's lines the row says so instead of claiming zero warnings verified.
    assert tp_rows.tp_rows(summary, "", 2, "ray")[1]["verify"] is False
