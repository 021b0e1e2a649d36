"""Tasks: perplexity with the KV compressed while decoding, LongEval-style line retrieval and
key-value retrieval (prefilled context, then the question decoded token by token, then a greedy
answer), and greedy continuations of given prompts matched token by token with bf16's, each
scored for many methods over one shared full-precision prefill."""
from __future__ import annotations

import bz2
import glob
import html
import importlib.util
import json
import os
import random
import re
import zipfile

import torch

from benchmarks.harness.kvsim import KVSim, prefill
from benchmarks.harness.methods import PRODUCT, Method
from benchmarks.harness.stats import (bootstrap_ppl, bootstrap_ppl_delta, bootstrap_ratio,
                                  token_match, wilson)

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_HINT = ("pip download --no-deps gensim==4.4.0 -d /tmp/gensim_dl  (or pip install gensim==4.4.0, "
             "or set MIKV_WIKI_BZ2 to the .bz2 file)")


# ---------------------------------------------------------------- Wikipedia text

def _wiki_bytes() -> bytes:
    path = os.environ.get("MIKV_WIKI_BZ2")
    if path:
        return open(path, "rb").read()
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        p = os.path.join(os.path.dirname(spec.submodule_search_locations[0]), WIKI_MEMBER)
        if os.path.exists(p):
            return open(p, "rb").read()
    for whl in sorted(glob.glob("/tmp/gensim_dl/gensim-4.4.0-*.whl")
                      + glob.glob(os.path.expanduser("~/.cache/mikv/gensim-4.4.0-*.whl"))):
        with zipfile.ZipFile(whl) as z:
            return z.read(WIKI_MEMBER)
    raise FileNotFoundError(f"the gensim Wikipedia excerpt was not found; run: {WIKI_HINT}")


def _strip_wiki(t: str) -> str:
    t = html.unescape(t)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    for _ in range(4):  # nested templates and tables
        t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\{\|[^{}]*?\|\}", "", t, flags=re.S)
    t = re.sub(r"\[\[(?:File|Image|Category):(?:[^\[\]]|\[\[[^\]]*\]\])*\]\]", "", t)
    t = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"^[*#:;|!].*$", "", t, flags=re.M)   # lists, table rows
    t = re.sub(r"=+\s*([^=]+?)\s*=+", r"\1", t)
    return re.sub(r"\n{2,}", "\n\n", t).strip()


def wiki_articles(min_chars: int = 2000) -> list[str]:
    xml = bz2.decompress(_wiki_bytes()).decode("utf-8")
    out = []
    for m in re.finditer(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        body = _strip_wiki(m.group(1))
        if len(body) >= min_chars and not body.lower().startswith("#redirect"):
            out.append(body)
    return out


# ---------------------------------------------------------------- perplexity

def perplexity(model, tok, methods: list[Method], n_windows: int, window: int,
               prefill_len: int = 64, chunk: int = 32, block_size: int = 16,
               recent_pages: int = PRODUCT.recent_pages, sink_pages: int = PRODUCT.sink_pages,
               on_window=None) -> dict[str, dict]:
    """Per method label@budget: ppl with bootstrap CI over chunks, n = scored tokens.

    Window i is the first `window` tokens of the i-th long article; the first `prefill_len`
    tokens are prefilled at full precision, the rest are fed in chunks of `chunk` tokens, each
    attending over the compressed past (its own chunk's pages are still hi). Only tokens
    predicted from decode chunks are scored (the prefill's are identical for every method)."""
    arts = [a for a in wiki_articles() if len(a) > window * 6]
    nll: dict[str, list[list[float]]] = {}
    ratios: dict[str, list[float]] = {}
    for w in range(n_windows):
        ids = tok(arts[w], add_special_tokens=False)["input_ids"][:window]
        pre = prefill(model, ids[:prefill_len])
        for m in methods:
            key = f"{m.label}@{m.budget}"
            sim = KVSim(model, m, pre, block_size, sink_pages=sink_pages,
                        recent_pages=recent_pages)
            for s in range(prefill_len, len(ids) - 1, chunk):
                e = min(s + chunk, len(ids) - 1)
                logits = sim.step(ids[s:e])
                target = torch.tensor(ids[s + 1:e + 1])
                lp = torch.log_softmax(logits.float(), -1)
                nll.setdefault(key, []).append((-lp[torch.arange(e - s), target]).tolist())
            ratios.setdefault(key, []).append(sim.kv_bytes_ratio)
        if on_window:
            on_window(w + 1, _ppl_rows(methods, nll, ratios))
    return _ppl_rows(methods, nll, ratios)


def _ppl_rows(methods, nll, ratios):
    out = {}
    base = nll.get("bf16@None")
    for m in methods:
        key = f"{m.label}@{m.budget}"
        if key in nll:
            ppl, lo, hi = bootstrap_ppl(nll[key])
            out[key] = dict(method=m.label, budget=m.budget, score=ppl, ci_low=lo, ci_high=hi,
                            n=sum(len(b) for b in nll[key]),
                            kv_bytes_ratio=sum(ratios[key]) / len(ratios[key]))
            if base is not None:  # paired difference to bf16 on the same tokens
                d, dlo, dhi = bootstrap_ppl_delta(base, nll[key])
                out[key].update(delta_vs_bf16=d, delta_ci_low=dlo, delta_ci_high=dhi)
    return out


# ---------------------------------------------------------------- retrieval

ADJ = ("amber bold brave calm clever cosmic crisp dusty eager fancy fierce gentle golden grand "
       "happy hollow icy jolly keen lively lucky mellow misty noble odd proud quiet rapid rusty "
       "shy silent silver sleepy smooth snowy solid sour spicy steady stormy sunny swift tame "
       "tidy torpid vivid wild windy witty young zesty").split()
NOUN = ("acorn anchor badger basket beacon breeze cactus candle canyon castle cedar comet "
        "coral crane desert dragon falcon fate feather forest garden glacier harbor hazel island "
        "jungle kettle lantern lemon marble meadow mirror canal orchard otter pebble pepper "
        "planet puzzle quartz raven river rocket saddle shadow spruce thunder tiger tulip "
        "valley violet walnut willow").split()
DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)


def line_sample(rng: random.Random, n_lines: int, depth: float):
    keys = rng.sample([f"{a}-{n}" for a in ADJ for n in NOUN], n_lines)
    vals = [rng.randrange(10000, 100000) for _ in keys]
    target = min(n_lines - 1, int(depth * n_lines))
    head = ("Below is a record of lines I want you to remember. Each line begins with 'line "
            "<line index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a "
            "numerical value. For each line index, memorize its corresponding "
            "<REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the "
            "corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")
    body = "".join(f"line {k}: REGISTER_CONTENT is <{v}>\n" for k, v in zip(keys, vals))
    question = (f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line "
                f"{keys[target]}? Answer with the number only.")
    return head + body, question, str(vals[target])


def kv_sample(rng: random.Random, n_pairs: int, depth: float):
    def uid():
        return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"
    pairs = [(uid(), uid()) for _ in range(n_pairs)]
    target = min(n_pairs - 1, int(depth * n_pairs))
    ctx = ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
           "JSON data:\n" + json.dumps(dict(pairs), indent=1) + "\n")
    question = f'\nKey: "{pairs[target][0]}"\nCorresponding value (only the value):'
    return ctx, question, pairs[target][1]


def _split_prompt(tok, context: str, question: str) -> tuple[list[int], list[int]]:
    """Chat-formatted prompt as (context ids to prefill, question+template tail to decode)."""
    marker = "\x00Q\x00"
    text = tok.apply_chat_template([{"role": "user", "content": context + marker}],
                                   tokenize=False, add_generation_prompt=True)
    pre, post = text.split(marker)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    return enc(pre), enc(question + post)


def _answer_ok(task: str, text: str, answer: str) -> bool:
    if task == "line_retrieval":
        m = re.search(r"\d{5}", text)
        return bool(m) and m.group(0) == answer
    return answer in text


def retrieval(model, tok, task: str, methods: list[Method], sizes: list[int], trials: int,
              seed: int = 0, max_new: int = 12, block_size: int = 16,
              recent_pages: int = PRODUCT.recent_pages, sink_pages: int = PRODUCT.sink_pages,
              on_trial=None) -> dict[str, dict]:
    """Accuracy per (method, size) with Wilson CIs. Context prefilled at full precision; the
    question is decoded token by token (so the policy sees its attention), then greedy answer."""
    sample = line_sample if task == "line_retrieval" else kv_sample
    hits: dict[tuple, list[int]] = {}
    ratios: dict[tuple, list[float]] = {}
    eos = set(filter(None, [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]))
    for size in sizes:
        for t in range(trials):
            rng = random.Random(f"{seed}-{task}-{size}-{t}")
            ctx, q, answer = sample(rng, size, DEPTHS[t % len(DEPTHS)])
            pre_ids, q_ids = _split_prompt(tok, ctx, q)
            pre = prefill(model, pre_ids, last_only=True)
            for m in methods:
                sim = KVSim(model, m, pre, block_size, sink_pages=sink_pages,
                            recent_pages=recent_pages)
                for i in q_ids:
                    logits = sim.step([i], last_only=True)
                out = []
                for _ in range(max_new):
                    nxt = int(logits[-1].argmax())
                    if nxt in eos:
                        break
                    out.append(nxt)
                    logits = sim.step([nxt], last_only=True)
                key = (m.label, m.budget, size)
                if os.environ.get("MIKV_EVAL_DEBUG"):
                    print(f"  {m.label}@{m.budget} size {size}: {tok.decode(out)!r} "
                          f"(want {answer})", flush=True)
                hits.setdefault(key, []).append(int(_answer_ok(task, tok.decode(out), answer)))
                ratios.setdefault(key, []).append(sim.kv_bytes_ratio)
            if on_trial:
                on_trial(size, t + 1, _acc_rows(hits, ratios, len(pre_ids) + len(q_ids)))
    return _acc_rows(hits, ratios, None)


def _acc_rows(hits, ratios, tokens):
    out = {}
    for (label, budget, size), h in hits.items():
        lo, hi = wilson(sum(h), len(h))
        out[f"{label}@{budget}/{size}"] = dict(
            method=label, budget=budget, size=size, score=sum(h) / len(h), ci_low=lo,
            ci_high=hi, n=len(h), kv_bytes_ratio=sum(ratios[(label, budget, size)]) /
            len(ratios[(label, budget, size)]))
    return out


# ---------------------------------------------------------------- greedy token match

def greedy_match(model, tok, methods: list[Method], prompts: list[list[int]], max_new: int,
                 block_size: int = 16, recent_pages: int = PRODUCT.recent_pages,
                 sink_pages: int = PRODUCT.sink_pages,
                 on_prompt=None) -> dict[str, dict]:
    """Greedy continuations of token-id prompts, max_new tokens each with no EOS stop (the
    e2e probe's SamplingParams), matched with bf16's by the e2e probe's token_match; score =
    token match rate with a bootstrap CI over prompts. All but the last prompt token are
    prefilled at full precision; the last one and every generated token are decode steps, so
    pages go lo (by the mass of the steps before) from the second generated token on."""
    outs: dict[str, list[list[int]]] = {}
    ratios: dict[str, list[float]] = {}
    hi_budget = {}
    for p, ids in enumerate(prompts):
        pre = prefill(model, ids[:-1], last_only=True)
        for m in methods:
            key = f"{m.label}@{m.budget}"
            sim = KVSim(model, m, pre, block_size, sink_pages=sink_pages,
                        recent_pages=recent_pages)
            out = [ids[-1]]
            for _ in range(max_new):
                out.append(int(sim.step(out[-1:], last_only=True)[-1].argmax()))
            if os.environ.get("MIKV_EVAL_DEBUG"):
                print(f"  {key} prompt {p}: {tok.decode(out[1:])!r}", flush=True)
            outs.setdefault(key, []).append(out[1:])
            ratios.setdefault(key, []).append(sim.kv_bytes_ratio)
            hi_budget[key] = sim.policy.hi_budget if sim.policy else None
        if on_prompt:
            on_prompt(p + 1, _match_rows(methods, outs, ratios, hi_budget))
    return _match_rows(methods, outs, ratios, hi_budget)


def _match_rows(methods, outs, ratios, hi_budget):
    out = {}
    base = outs.get("bf16@None")
    for m in methods:
        key = f"{m.label}@{m.budget}"
        if base is None or key not in outs:
            continue
        tm = token_match(base, outs[key])
        _, lo, hi = bootstrap_ratio([(token_match([a], [b])["token_match_rate"], 1)
                                     for a, b in zip(base, outs[key])])
        out[key] = dict(method=m.label, budget=m.budget, hi_budget=hi_budget[key],
                        score=tm["token_match_rate"], ci_low=lo, ci_high=hi,
                        n=sum(len(o) for o in outs[key]),
                        kv_bytes_ratio=sum(ratios[key]) / len(ratios[key]), **tm,
                        tokens=outs[key])
    return out
