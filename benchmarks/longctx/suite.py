"""The long-context task suite (RULER-style): deterministic trials as token ids, and their scoring.

Six tasks, every trial a chat prompt of `length` tokens (the model's chat template included):
  niah_single        one "special magic number" for a key hidden in Wikipedia text at a depth
  niah_multikey      4-8 keys with their numbers in the text; the question asks one of them
  niah_multivalue    one key with 4 numbers at spread depths; the answer must name all 4
  variable_tracking  a chain VAR A = 12345, VAR B = VAR A, ... (5 names) in the text; name all
  line_retrieval     LongEval lines "line <key>: REGISTER_CONTENT is <n>"; the n of one key
  kv_retrieval       a JSON object of random ids; the value of one key

Prompts are built from token ids (haystack, needles and question tokenized apart and joined at
sentence ends), so every trial has its exact length with any tokenizer, and the same ids go to
vLLM and to the CPU harness. A trial's randomness comes from (seed, task, length, index) alone.
The haystack is the Wikipedia excerpt the quality harness uses (the gensim package, or
MIKV_WIKI_BZ2)."""
from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field

from benchmarks.harness.tasks import ADJ, NOUN  # the LongEval keys of the harness's line retrieval

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking",
         "line_retrieval", "kv_retrieval")
# Needle depths, cycled over a cell's trials: spread from near the start to near the end.
DEPTHS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))
ANSWER_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48,
                 "variable_tracking": 40, "line_retrieval": 16, "kv_retrieval": 24}


@dataclass
class Trial:
    task: str
    length: int                 # target prompt length in tokens (the cell)
    index: int                  # trial number within the cell
    depth: float                # where the asked-for item sits (0 = start, 1 = end)
    prompt_ids: list[int]
    answers: list[str]          # every one must appear in the output
    max_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.length}/{self.index}"

    def digest(self) -> str:
        """Short hash of the prompt ids: the same trial on two paths has the same digest."""
        return hashlib.sha256(json.dumps(self.prompt_ids).encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        return asdict(self)


def score(trial: Trial, text: str) -> bool:
    """Exact match: every expected string appears in the output (numbers as whole numbers)."""
    for a in trial.answers:
        if a.isdigit():
            if a not in re.findall(r"\d+", text):
                return False
        elif a not in text:
            return False
    return True


# ---------------------------------------------------------------- building prompts

class Builder:
    """Turns task parts into exact-length prompt ids with one tokenizer and one haystack."""

    def __init__(self, tok, haystack_text: str | None = None) -> None:
        self.tok = tok
        marker = "\x00Q\x00"
        text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                       add_generation_prompt=True)
        self.chat_head, self.chat_tail = text.split(marker)
        self._hay_text = haystack_text
        self._hay: list[int] | None = None
        self._ends: list[int] | None = None  # sorted

    def enc(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    @property
    def haystack(self) -> list[int]:
        if self._hay is None:
            if self._hay_text is None:
                from benchmarks.harness.tasks import wiki_articles
                self._hay_text = "\n\n".join(wiki_articles())
            self._hay = self.enc(self._hay_text)
            # Token positions right after a sentence or paragraph end: where needles go.
            self._ends = [i + 1 for i, t in enumerate(self.tok.convert_ids_to_tokens(self._hay))
                          if t.rstrip("Ċ").endswith(".") or t.endswith("Ċ")]
        return self._hay

    def sentence_end_at_or_after(self, filler_start: int, pos: int, limit: int) -> int:
        """A position in a filler window (absolute start `filler_start`) at a sentence end near
        `pos`, searching forward up to 200 tokens, else `pos`."""
        ends = self._ends
        i = bisect.bisect_left(ends, filler_start + pos)
        if i < len(ends) and ends[i] - filler_start <= min(limit, pos + 200):
            return ends[i] - filler_start
        return pos

    def assemble(self, rng: random.Random, length: int, head: str, inserts: list[tuple[float, str]],
                 question: str, answer_prefix: str = "") -> list[int]:
        """Chat prompt of exactly `length` tokens: head text, haystack with `inserts` (depth,
        text) placed at sentence ends near their depths, then the question (and the start of
        the assistant's answer, if given)."""
        pre = self.enc(self.chat_head + head)
        post = self.enc(question + self.chat_tail + answer_prefix)
        needles = [(d, self.enc(t)) for d, t in inserts]
        n = length - len(pre) - len(post) - sum(len(x) for _, x in needles)
        if n < 0:
            raise ValueError(f"{length} tokens cannot hold this trial's parts")
        hay = self.haystack
        # a sentence end with n haystack tokens after it (the ends are sorted)
        s = rng.choice(self._ends[:bisect.bisect_right(self._ends, len(hay) - n)])
        body = hay[s:s + n]
        cuts = sorted((self.sentence_end_at_or_after(s, int(d * n), n), i)
                      for i, (d, _) in enumerate(needles))
        out, at = list(pre), 0
        for pos, i in cuts:
            out += body[at:pos] + needles[i][1]
            at = pos
        out += body[at:] + post
        assert len(out) == length, (len(out), length)
        return out

    def assemble_items(self, length: int, head: str, items: list[str], question: str) -> tuple[
            list[int], int]:
        """Chat prompt of at most `length` tokens made of whole `items` (lines, JSON pairs) after
        `head` and before `question`; returns (ids, number of items used)."""
        pre = self.enc(self.chat_head + head)
        post = self.enc(question + self.chat_tail)
        room = length - len(pre) - len(post)
        out, used = list(pre), 0
        for it in items:
            ids = self.enc(it)
            if len(ids) > room:
                break
            out += ids
            room -= len(ids)
            used += 1
        return out + post, used


# ---------------------------------------------------------------- the tasks

def _key(rng: random.Random, taken: set) -> str:
    while True:
        k = f"{rng.choice(ADJ)}-{rng.choice(NOUN)}"
        if k not in taken:
            taken.add(k)
            return k


def _number(rng: random.Random, taken: set) -> str:
    while True:
        v = str(rng.randrange(1_000_000, 10_000_000))
        if v not in taken:
            taken.add(v)
            return v


NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to "
             "memorize them. I will quiz you about the numbers afterwards.\n\n")


def _needle(key: str, value: str, one_of: bool = False) -> str:
    what = "One of the special magic numbers" if one_of else "The special magic number"
    return f" {what} for {key} is: {value}. "


def niah_single(b: Builder, rng, length, depth):
    key, value = _key(rng, set()), _number(rng, set())
    q = (f"\n\nWhat is the special magic number for {key} mentioned in the provided text? "
         "Answer with the number only.")
    ids = b.assemble(rng, length, NIAH_HEAD, [(depth, _needle(key, value))], q)
    return ids, [value], {"key": key}


def niah_multikey(b: Builder, rng, length, depth):
    keys, values = set(), set()
    n = rng.randint(4, 8)
    pairs = [(_key(rng, keys), _number(rng, values)) for _ in range(n)]
    # The asked-for needle at the trial's depth, the distractors anywhere.
    inserts = [(depth, _needle(*pairs[0]))] + [(rng.random(), _needle(k, v)) for k, v in pairs[1:]]
    q = (f"\n\nWhat is the special magic number for {pairs[0][0]} mentioned in the provided "
         "text? Answer with the number only.")
    ids = b.assemble(rng, length, NIAH_HEAD, inserts, q)
    return ids, [pairs[0][1]], {"keys": n}


def niah_multivalue(b: Builder, rng, length, depth):
    key, values = _key(rng, set()), set()
    vals = [_number(rng, values) for _ in range(4)]
    # First value at the trial's depth, the others spread over the rest of the text.
    depths = [depth] + [rng.random() for _ in vals[1:]]
    q = (f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
         "Answer with the numbers only, separated by commas.")
    ids = b.assemble(rng, length, NIAH_HEAD, [(d, _needle(key, v, one_of=True))
                                              for d, v in zip(depths, vals)], q)
    return ids, vals, {"key": key}


def variable_tracking(b: Builder, rng, length, depth):
    names: set = set()

    def name():
        while True:
            v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if v not in names:
                names.add(v)
                return v

    chain = [name() for _ in range(5)]
    value = str(rng.randrange(10000, 100000))
    stmts = [f" VAR {chain[0]} = {value}. "] + [f" VAR {chain[i]} = VAR {chain[i - 1]}. "
                                                for i in range(1, 5)]
    # Assignments in order, the first at the trial's depth, the rest after it.
    depths = sorted([depth] + [depth + (1 - depth) * rng.random() for _ in stmts[1:]])
    head = ("Memorize and track the chain of variable assignments hidden in the following "
            "text.\n\n")
    q = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text "
         "above.")
    # Without the answer's start primed (as RULER primes it), the 1.5B model names only the
    # first variable of the chain, with every KV format.
    prefix = (f"According to the chain of variable assignments in the text above, 5 variables "
              f"are assigned the value {value}, they are:")
    ids = b.assemble(rng, length, head, list(zip(depths, stmts)), q, prefix)
    return ids, chain, {"value": value}


LINE_HEAD = ("Below is a record of lines I want you to remember. Each line begins with 'line "
             "<line index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a "
             "numerical value. For each line index, memorize its corresponding "
             "<REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the "
             "corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")


def line_retrieval(b: Builder, rng, length, depth):
    keys: set = set()
    n = min(length // 8, len(ADJ) * len(NOUN) - 1)  # more than fit; 32K needs ~2,100 of 3,080
    lines = [(_key(rng, keys), str(rng.randrange(10000, 100000))) for _ in range(n)]
    q_of = lambda k: (f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in "
                      f"line {k}? Answer with the number only.")
    # Fit the lines first (the question's length does not depend on which key it names much:
    # keys are two words), then ask for the line at the depth.
    probe, used = b.assemble_items(length - 8, LINE_HEAD,
                                   [f"line {k}: REGISTER_CONTENT is <{v}>\n" for k, v in lines],
                                   q_of(lines[0][0]))
    target = min(used - 1, int(depth * used))
    k, v = lines[target]
    ids, _ = b.assemble_items(length, LINE_HEAD, [f"line {k}: REGISTER_CONTENT is <{v}>\n"
                                                  for k, v in lines[:used]], q_of(k))
    return ids, [v], {"lines": used}


def kv_retrieval(b: Builder, rng, length, depth):
    def uid():
        return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"

    pairs = [(uid(), uid()) for _ in range(length // 12)]
    head = ("Extract the value corresponding to the specified key in the JSON object below."
            "\n\nJSON data:\n{")
    q_of = lambda k: f'\n}}\n\nKey: "{k}"\nCorresponding value (only the value):'
    items = [("\n" if i == 0 else ",\n") + f' "{k}": "{v}"' for i, (k, v) in enumerate(pairs)]
    _, used = b.assemble_items(length - 4, head, items, q_of(pairs[0][0]))
    target = min(used - 1, int(depth * used))
    ids, _ = b.assemble_items(length, head, items[:used], q_of(pairs[target][0]))
    return ids, [pairs[target][1]], {"pairs": used}


MAKERS = {"niah_single": niah_single, "niah_multikey": niah_multikey,
          "niah_multivalue": niah_multivalue, "variable_tracking": variable_tracking,
          "line_retrieval": line_retrieval, "kv_retrieval": kv_retrieval}


def make_trials(tok, tasks=TASKS, lengths=(4096, 8192, 16384), trials: int = 50, seed: int = 0,
                haystack_text: str | None = None) -> list[Trial]:
    b = Builder(tok, haystack_text)
    out = []
    for length in lengths:
        for task in tasks:
            for i in range(trials):
                rng = random.Random(f"{seed}-{task}-{length}-{i}")
                depth = DEPTHS[i % len(DEPTHS)]
                ids, answers, meta = MAKERS[task](b, rng, length, depth)
                out.append(Trial(task, length, i, depth, ids, answers, ANSWER_TOKENS[task], meta))
    return out


def save(trials: list[Trial], path: str) -> None:
    with open(path, "w") as f:
        for t in trials:
            f.write(json.dumps(t.to_json()) + "\n")


def load(path: str) -> list[Trial]:
    with open(path) as f:
        return [Trial(**json.loads(line)) for line in f if line.strip()]
