"""Fidelity to the fp16 reference of the same model, engine and context: teacher-forced KL divergence and
top-1 agreement on a fixed prompt set, and agreement of greedy generations.

Scoring is KV-faithful (continuations read the cache back), so KV quantization shows. The reference is
computed once per (model, engine, device, context, prompt set), cached, and shared by every run of a sweep.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from kvexp import organism
from kvexp.checkpoint import model_key
from kvexp.config import QuantConfig, RunSpec
from kvexp.engines import engine_class
from kvexp.quant.calib import BUILTIN

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
    q = spec.cfg.quant
    return q.weights.dtype == "auto" and q.kv_cache.dtype == "auto"


def reference_spec(spec: RunSpec) -> RunSpec:
    cfg = dataclasses.replace(spec.cfg, quant=QuantConfig(name="fp16"))
    return dataclasses.replace(spec, cfg=cfg, config_hash=spec.config_hash + "-ref")


def _reference_path(spec: RunSpec, device: str) -> Path:
    c = spec.cfg
    key = {"model": dataclasses.asdict(c.model) | {"path": model_key(c.model.path)},
           "engine": dataclasses.asdict(spec.engine_options), "device": device,
           "prompt_len": c.context.prompt_len, "fidelity": dataclasses.asdict(c.eval.fidelity),
           "version": PROMPT_SET_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return spec.cache_dir / "reference" / f"fidelity-{digest}.pt"


def observe(engine, spec: RunSpec) -> dict:
    """What the metrics compare: teacher-forced log-probs [S, V] and greedy tokens per prompt."""
    reqs = fidelity_requests(engine.tokenizer, spec)
    logprobs = engine.continuation_logprobs(reqs, kv_faithful=True)
    greedy = engine.generate([c for c, _ in reqs], spec.cfg.eval.fidelity.gen_tokens).tokens
    return {"logprobs": logprobs, "greedy": greedy}


def reference(spec: RunSpec, device: str) -> dict | None:
    """The cached reference, building an fp16 engine to compute it if needed. None for the reference run itself
    (it compares against its own observation, computed with the run's engine)."""
    if is_reference(spec):
        return None
    path = _reference_path(spec, device)
    if path.exists():
        return torch.load(path)
    log.info("computing the fp16 reference for fidelity (cached at %s)", path)
    ref_spec = reference_spec(spec)
    engine = engine_class(spec.engine_options.name)(ref_spec)
    engine.build()
    try:
        obs = observe(engine, ref_spec)
    finally:
        engine.close()
    save_reference(spec, device, obs)
    return obs


def save_reference(spec: RunSpec, device: str, obs: dict) -> None:
    path = _reference_path(spec, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obs, tmp)
    tmp.rename(path)


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
