"""Haystack text made offline, and fitting a prompt to a token budget with the model's tokenizer.

Two fillers, as RULER (Hsieh et al. 2024, arXiv:2404.06654) uses: the repeated "noise" sentences of the
original passkey test (Mohtashami & Jaggi 2023) for passkey and variable tracking, and varied sentences
(RULER uses essays; we build them from word lists, so nothing is downloaded) for needle-in-a-haystack.
"""
from __future__ import annotations

import random
from typing import Callable

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

ADJECTIVES = ("old", "quiet", "bright", "small", "green", "heavy", "distant", "warm", "narrow", "busy", "calm",
              "early", "broken", "golden", "plain", "wooden")
NOUNS = ("river", "village", "farmer", "train", "garden", "market", "teacher", "bridge", "library", "window",
         "harbor", "mountain", "kitchen", "letter", "road", "orchard", "engine", "painter")
VERBS = ("crossed", "watched", "repaired", "visited", "painted", "followed", "carried", "passed", "opened",
         "described", "remembered", "cleaned")
PLACES = ("near the station", "after the storm", "before dawn", "in the valley", "along the coast",
          "behind the school", "during the fair", "across the square", "at the end of the week")

UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def noise(count: int) -> list[str]:
    return [NOISE[i % len(NOISE)] for i in range(count)]


def sentences(rng: random.Random, count: int) -> list[str]:
    """`count` varied, grammatical filler sentences drawn from the word lists."""
    out = []
    for _ in range(count):
        subject, obj = rng.choice(NOUNS), rng.choice(NOUNS)
        out.append(f"The {rng.choice(ADJECTIVES)} {subject} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} "
                   f"{obj} {rng.choice(PLACES)}.")
    return out


def insert_at_depths(filler: list[str], needles: list[tuple[float, str]]) -> str:
    """Filler sentences with each needle inserted at its depth (0 = start, 1 = end), joined by spaces.

    Needles at the same depth keep their given order, so a variable-tracking chain stays in order.
    """
    placed = sorted(((round(depth * len(filler)), order, text) for order, (depth, text) in enumerate(needles)))
    parts, start = [], 0
    for pos, _, text in placed:
        parts.extend(filler[start:pos])
        parts.append(text)
        start = pos
    parts.extend(filler[start:])
    return " ".join(parts)


def largest_fitting(fits: Callable[[int], bool], guess: int) -> int:
    """Largest k >= 0 with fits(k), for fits True up to some k and False beyond; -1 if even fits(0) fails.

    Starts at `guess` (the previous sample's answer, nearly always right) and gallops, so a 32k-token prompt
    is tokenized a handful of times rather than once per filler sentence.
    """
    guess = max(guess, 0)
    step = max(1, guess // 64)
    if fits(guess):
        lo, hi = guess, guess + step
        while fits(hi):
            lo, hi, step = hi, hi + 2 * step, 2 * step
    else:
        hi, lo = guess, guess - step
        while lo >= 0 and not fits(lo):
            hi, lo, step = lo, lo - 2 * step, 2 * step
        if lo < 0:
            if not fits(0):
                return -1
            lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
