"""Fidelity to the fp16 reference of the same model, engine and context: teacher-forced KL divergence and
top-1 agreement on a fixed prompt set, and agreement of greedy generations.

Scoring is KV-faithful (continuations read the cache back), so KV quantization shows. The reference is
computed once per (reference build, context, prompt set), cached, and shared by every run of a sweep.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from kvexp import artifacts, organism
from kvexp.config import RunSpec
from kvexp.engines import engine_class
from kvexp.quant.calib import BUILTIN
from kvexp.resolve import reference_spec

log = logging.getLogger(__name__)
PROMPT_SET_VERSION = 1


def fidelity_requests(tokenizer, spec: RunSpec) -> list[tuple[list[int], list[int]]]:
    """num_prompts windows of shipped text (repeated to length): prompt_len context + score_tokens continuation.
    builtin:organism reads its own task's documents instead: shipped prose is all unknown words to it."""
    f, n_ctx = spec.cfg.eval.fidelity, spec.cfg.context.prompt_len
    if organism.is_organism(spec.cfg.model.path):
        text = "\n".join(organism.documents(f.num_prompts, n_ctx + f.score_tokens, seed="fidelity"))
    else:
        text = BUILTIN.read_text()
    ids = tokenizer.encode(text, add_special_tokens=False)
    need = n_ctx + f.score_tokens
    stride = max(1, len(ids) // max(f.num_prompts, 1))
    ids = ids * (need // len(ids) + 2)
    windows = [ids[i * stride: i * stride + need] for i in range(f.num_prompts)]
    return [(w[:n_ctx], w[n_ctx:]) for w in windows]


def is_reference(spec: RunSpec) -> bool:
    return not spec.build.weights.quantized and not spec.build.kv.quantized


def _reference_path(spec: RunSpec) -> Path:
    """Keyed by the reference build (this run's BuildSpec unquantized: model, engine, device, dtype, attention),
    the context length and the prompt set."""
    c = spec.cfg
    key = {"build": reference_spec(spec).build.identity, "prompt_len": c.context.prompt_len,
           "fidelity": dataclasses.asdict(c.eval.fidelity), "version": PROMPT_SET_VERSION}
    return artifacts.path(spec.cache_dir, "reference/fidelity", key, ".pt")


def observe(engine, spec: RunSpec) -> dict:
    """What the metrics compare: teacher-forced log-probs [S, V] and greedy tokens per prompt."""
    reqs = fidelity_requests(engine.tokenizer, spec)
    logprobs = engine.continuation_logprobs(reqs, kv_faithful=True)
    greedy = engine.generate([c for c, _ in reqs], spec.cfg.eval.fidelity.gen_tokens).tokens
    return {"logprobs": logprobs, "greedy": greedy}


def reference(spec: RunSpec) -> dict | None:
    """The cached reference, building an fp16 engine to compute it if needed. None for the reference run itself
    (it compares against its own observation, computed with the run's engine: save_reference)."""
    if is_reference(spec):
        return None

    def build(tmp: Path) -> None:
        log.info("computing the fp16 reference for fidelity (cached under %s)", spec.cache_dir / "reference")
        ref_spec = reference_spec(spec)
        engine = engine_class(spec.engine_options.name)(ref_spec)
        engine.build()
        try:
            torch.save(observe(engine, ref_spec), tmp)
        finally:
            engine.close()

    return artifacts.cached(_reference_path(spec), "fidelity reference", build, torch.load)[0]


def save_reference(spec: RunSpec, obs: dict) -> dict:
    """The reference run's own observation, cached for the quantized runs; returns the cached copy (which is obs
    unless a parallel job wrote it first)."""
    return artifacts.cached(_reference_path(spec), "fidelity reference", lambda tmp: torch.save(obs, tmp),
                            torch.load)[0]


def compare(ref: dict, run: dict) -> dict[str, float]:
    """KL(ref || run) per position (nats), top-1 agreement, greedy token agreement and common-prefix fraction."""
    kls, top1 = [], []
    for p, q in zip(ref["logprobs"], run["logprobs"]):
        kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)  # clamp: rounding can make an exact match -1e-9
        kls.append(kl)
        top1.append((p.argmax(-1) == q.argmax(-1)).float())
    kl, agree = torch.cat(kls), torch.cat(top1)
    match, prefix = [], []
    for a, b in zip(ref["greedy"], run["greedy"]):
        eq = [x == y for x, y in zip(a, b)]
        match.append(sum(eq) / len(eq))
        prefix.append((eq.index(False) if False in eq else len(eq)) / len(eq))
    return {"fid.kl_mean": kl.mean().item(), "fid.kl_max": kl.max().item(), "fid.top1_agree": agree.mean().item(),
            "fid.greedy_agree": sum(match) / len(match), "fid.greedy_prefix": sum(prefix) / len(prefix)}
