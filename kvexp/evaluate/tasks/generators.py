"""The offline tasks' documents: long-context retrieval probes sized to a token budget, and two short tasks.

Every sample i of a task draws from its own Random("<version>:<task>:<seed>:<i>"), so sample i is the same
whatever the number of samples, and the same seed gives the same documents byte for byte.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from kvexp import organism
from kvexp.errors import ConfigError
from kvexp.evaluate.tasks import text

# Needle depths, cycled over samples so each depth is probed equally often (RULER, "lost in the middle").
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_MARGIN = 4  # generated tokens beyond the answer: room for a leading space or newline


@dataclass(frozen=True)
class Probe:
    """A retrieval question: needles hidden at depths in filler text, answered by the `answers` items."""
    prefix: str
    needles: list[tuple[float, str]]
    question: str
    answers: list[str]
    depth: float  # depth of the needle that answers the question (vt: of its first assignment)


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(text.UPPER) for _ in range(5))


def passkey(rng: random.Random, i: int) -> Probe:
    """The passkey test of Mohtashami & Jaggi (2023): one 5-digit key in the noise."""
    key, depth = str(rng.randint(10000, 99999)), DEPTHS[i % len(DEPTHS)]
    return Probe(prefix="A pass key is hidden in the text below. Find it and remember it.\n",
                 needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
                 question="\nWhat is the pass key? The pass key is", answers=[key], depth=depth)


def niah_multikey(rng: random.Random, i: int) -> Probe:
    """RULER niah_multikey_1: one asked-for key among three distractor keys, each at its own depth."""
    keys = rng.sample([f"{a}-{n}" for a in text.ADJECTIVES for n in text.NOUNS], 4)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    depth = DEPTHS[i % len(DEPTHS)]
    others = rng.sample([d for d in DEPTHS if d != depth], len(keys) - 1)
    needles = [(d, f"The special magic number for {k} is {v}.") for d, k, v in zip([depth, *others], keys, values)]
    return Probe(prefix="Special magic numbers are hidden in the text below. Remember them.\n", needles=needles,
                 question=f"\nWhat is the special magic number for {keys[0]}? It is",
                 answers=[values[0]], depth=depth)


def variable_tracking(rng: random.Random, i: int) -> Probe:
    """RULER vt: a chain of 4 variables (3 hops) bound to one value, and a 2-variable distractor chain."""
    names: list[str] = []
    while len(names) < 6:
        name = _name(rng)
        if name not in names:
            names.append(name)
    value, other = rng.sample(range(10000, 99999), 2)
    needles = []
    for chain, val in ((names[:4], value), (names[4:], other)):
        depths = sorted(rng.random() for _ in chain)  # a chain is inserted in order, at random depths
        needles += [(depths[0], f"VAR {chain[0]} = {val}.")]
        needles += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
    return Probe(prefix="Memorize and track the chain of variable assignments hidden in the text below.\n",
                 needles=needles,
                 question=f"\nWhich variables are assigned the value {value}? They are",
                 answers=names[:4], depth=needles[0][0])


# name -> (probe maker, filler): RULER's noise for passkey and vt, varied sentences for the haystack.
LONG_TASKS: dict[str, tuple[Callable[[random.Random, int], Probe], str]] = {
    "kvexp_passkey": (passkey, "noise"),
    "kvexp_niah_multikey": (niah_multikey, "sentences"),
    "kvexp_vt": (variable_tracking, "noise"),
}


def sample_rng(task: str, seed: int, i: int, version: int) -> random.Random:
    return random.Random(f"{version}:{task}:{seed}:{i}")  # str seeds hash with sha512: stable across runs


def max_gen_toks(tokenizer, probes: list[Probe]) -> int:
    return max(len(tokenizer.encode(" " + ", ".join(p.answers), add_special_tokens=False))
               for p in probes) + ANSWER_MARGIN


def fit_probe(tokenizer, task: str, probe: Probe, filler: str, rng: random.Random, budget: int,
              guess: int) -> dict:
    """The document whose prompt is the longest that fits `budget` tokens (as the adapter encodes it)."""
    # A filler sentence is >= 8 tokens for any tokenizer that keeps words whole, so this pool always suffices.
    pool = text.noise(budget) if filler == "noise" else text.sentences(rng, budget // 8 + 8)

    def build(k: int) -> str:
        return probe.prefix + text.insert_at_depths(pool[:k], probe.needles) + probe.question

    def fits(k: int) -> bool:
        return k <= len(pool) and len(tokenizer.encode(build(k))) <= budget

    k = text.largest_fitting(fits, guess)
    if k < 0:
        need = len(tokenizer.encode(build(0)))
        raise ConfigError(f"eval task {task}: its instructions and needles take {need} tokens with this tokenizer, "
                          f"more than the {budget} the context leaves for the prompt; raise context.prompt_len")
    prompt = build(k)
    return {"input": prompt, "target": ", ".join(probe.answers), "answers": probe.answers, "depth": probe.depth,
            "filler_sentences": k, "prompt_tokens": len(tokenizer.encode(prompt))}


def arithmetic(rng: random.Random) -> dict:
    """A 4-way multiple-choice sum: exercises loglikelihood (and few-shot) with no download."""
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    right = a + b
    wrong = rng.sample([right - 10, right - 2, right - 1, right + 1, right + 2, right + 10], 3)
    choices = [str(c) for c in [right, *wrong]]
    rng.shuffle(choices)
    return {"question": f"Question: What is {a} plus {b}?\nAnswer:", "choices": choices,
            "label": choices.index(str(right))}


def prose(tokenizer, rng: random.Random, budget: int) -> dict:
    """Filler prose of about `budget` tokens, for perplexity through loglikelihood_rolling."""
    pool = text.sentences(rng, budget // 8 + 8)
    k = text.largest_fitting(lambda n: n <= len(pool) and len(tokenizer.encode(" ".join(pool[:n]))) <= budget,
                             budget // 12)
    return {"text": " ".join(pool[:max(k, 1)])}


def recall(tokenizer, rng_for: Callable[[], random.Random], i: int, budget: int, guess: int) -> dict:
    """A multi-query associative recall document of kvexp.organism's task, its prompt the longest that fits
    `budget` tokens: records early, queries late, the prompt ending on the asked key, the answer its value.

    Any tokenizer can encode it (the words are plain text); the organism's spends one token per word.
    rng_for() gives the sample's generator afresh, so each candidate length draws the same way.
    """
    def build(words: int) -> tuple[list[str], list[str]]:
        return organism.eval_doc(rng_for(), words, i)

    def fits(words: int) -> bool:  # too short for a document counts as fitting: largest_fitting needs a prefix
        return words < organism.MIN_WORDS or len(tokenizer.encode(" ".join(build(words)[0]))) <= budget

    words = text.largest_fitting(fits, guess)
    if words < organism.MIN_WORDS:
        need = len(tokenizer.encode(" ".join(build(organism.MIN_WORDS)[0])))
        raise ConfigError(f"eval task kvexp_recall: its shortest prompt takes {need} tokens with this tokenizer, more "
                          f"than the {budget} the context leaves for the prompt; raise context.prompt_len")
    prompt, answer = build(words)
    ask = prompt.index(organism.ASK)
    return {"input": " ".join(prompt), "target": " ".join(answer), "words": words,
            "records": prompt[:ask].count(organism.END), "queries": prompt[ask:].count(organism.END) + 1,
            "prompt_tokens": len(tokenizer.encode(" ".join(prompt)))}
