"""Exact-match scoring of the offline generation tasks, referenced from their YAMLs as `!function`.

A custom process_results keeps the metric local: a metric name outside lm-eval's registry would be looked
up on the Hugging Face Hub (evaluate.load), which offline runs cannot reach.
"""
from __future__ import annotations

import re
from collections import Counter

# Words a model may add around the answer items ("VAR ABCDE and VAR FGHIJ"); never part of an answer.
IGNORED = {"VAR", "AND"}


def answer_items(text: str) -> Counter:
    return Counter(w for w in re.findall(r"\w+", text.upper()) if w not in IGNORED)


def process_results(doc: dict, results: list[str]) -> dict:
    """exact_match = 1.0 when the generation holds exactly the answer items, in any order.

    One answer (passkey, needle value) is plain exact match after trimming spaces and punctuation; variable
    tracking's answer is a set of names, so order does not count (RULER scores it as a set too).
    """
    return {"exact_match": float(answer_items(results[0]) == answer_items(" ".join(doc["answers"])))}


def process_results_ordered(doc: dict, results: list[str]) -> dict:
    """exact_match = 1.0 when the generation's words are the target's, in order (kvexp_recall: a value is a
    sequence of words, and a swapped pair is a wrong answer). Case, spaces and punctuation are ignored."""
    return {"exact_match": float(re.findall(r"\w+", results[0].upper()) == re.findall(r"\w+", doc["target"].upper()))}
