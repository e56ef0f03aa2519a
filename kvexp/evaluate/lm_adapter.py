"""Any kvexp Engine as an lm-eval LM, so lm-eval's tasks are scored by the engine and quantization under test.

Tokenization follows lm-eval's conventions, as its HFLM does: TemplateLM's context/continuation split, BOS
(else EOS) as the prefix of an empty context, lm-eval's rolling windows for perplexity, stop strings and EOS
ending a generation. Decoding is greedy. Every request is cut to fit engine.max_seq_len, context +
continuation (or prompt + new tokens) included, by dropping context tokens from the left as HFLM does.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from kvexp.core.engine import Engine

log = logging.getLogger(__name__)

TokenRequest = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), ctx ids, cont ids)


def sorted_batches(keys: Sequence, batch_size: int) -> list[list[int]]:
    """Indices batched longest-first (padding waste is lowest and an out-of-memory shows at once)."""
    order = sorted(range(len(keys)), key=lambda i: keys[i], reverse=True)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class KvexpLM(TemplateLM):
    """lm-eval LM over a built kvexp Engine: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, engine: Engine, *, batch_size: int, kv_faithful: bool):
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.batch_size = batch_size
        self.kv_faithful = kv_faithful
        self._warned_sampling = False

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is conditioned on; HFLM prefers BOS and falls back to EOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.engine.max_seq_len

    def get_model_info(self) -> dict:
        """Recorded by lm-eval in results["config"]: what produced these scores."""
        return {"engine": type(self.engine).__name__, "kv_faithful": self.kv_faithful,
                "max_seq_len": self.max_length, "batch_size": self.batch_size}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            # A prompt that already starts with BOS (chat templates) must not get a second one (as HFLM).
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ---- loglikelihood ----
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so context + continuation fits max_length (HFLM keeps one more token;
        kvexp engines hold the whole request in their cache, so we keep the total within max_length)."""
        if len(continuation) >= self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens does not fit max_seq_len={self.max_length}")
        return context[-(self.max_length - len(continuation)):], continuation

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probs, greedy?) per request, in input order; the engine scores batch_size at a time."""
        fitted = [self._fit(ctx, cont) for _, ctx, cont in requests]
        cut = sum(len(ctx) + len(cont) > self.max_length for _, ctx, cont in requests)
        if cut:
            log.warning("%d of %d requests exceed max_seq_len=%d: their contexts lose tokens from the left",
                        cut, len(requests), self.max_length)
        out: list = [None] * len(fitted)
        with tqdm(total=len(fitted), disable=disable_tqdm, desc="kvexp loglikelihood") as bar:
            for batch in sorted_batches([len(c) + len(t) for c, t in fitted], self.batch_size):
                scores = self.engine.score([fitted[i] for i in batch], kv_faithful=self.kv_faithful)
                for i, score in zip(batch, scores):
                    out[i] = score
                bar.update(len(batch))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows that each fit max_length (HFLM's scheme)."""
        windows, owner = [], []
        for doc, (text,) in enumerate(req.args for req in requests):
            # Windows of max_length - 1 predictions: each window's context + continuation is max_length tokens.
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append(((text, ""), ctx, cont))
                owner.append(doc)
        totals = [0.0] * len(requests)
        for doc, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[doc] += logprob
        return totals

    # ---- generation ----
    def _generation_args(self, gen_kwargs: dict) -> tuple[int, list[str]]:
        """(max new tokens, stop strings incl. EOS) from a task's generation kwargs."""
        kwargs = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=256)
        if kwargs.get("do_sample") and not self._warned_sampling:
            log.warning("generation kwargs ask for sampling (%s); kvexp decodes greedily", gen_kwargs)
            self._warned_sampling = True
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        max_new = kwargs["max_gen_toks"]
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_seq_len={self.max_length}; "
                             "use a longer context.prompt_len/gen_len")
        return max_new, handle_stop_sequences(kwargs.get("until"), eos=eos)

    def _cut(self, tokens: list[int], until: list[str]) -> str:
        """The text before the first EOS token, then before the first stop string (engines never stop early)."""
        if self.eot_token_id in tokens:
            tokens = tokens[:tokens.index(self.eot_token_id)]
        return postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at its stop strings; batched per max_new_tokens."""
        args = [self._generation_args(req.args[1]) for req in requests]
        prompts = [self.tok_encode(req.args[0]) for req in requests]
        groups: dict[int, list[int]] = defaultdict(list)
        for i, (max_new, _) in enumerate(args):
            groups[max_new].append(i)
        # kv_faithful: every new token read from the cache, the first included (Engine.generate_from_cache)
        generate = self.engine.generate_from_cache if self.kv_faithful else self.engine.generate
        out: list = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="kvexp generate_until") as bar:
            for max_new, members in groups.items():
                keep = self.max_length - max_new
                cut = sum(len(prompts[i]) > keep for i in members)
                if cut:
                    log.warning("%d prompts exceed max_seq_len - max_gen_toks = %d tokens: they lose their start",
                                cut, keep)
                for batch in sorted_batches([len(prompts[i]) for i in members], self.batch_size):
                    idx = [members[j] for j in batch]
                    gens = generate([prompts[i][-keep:] for i in idx], max_new)
                    for i, tokens in zip(idx, gens.tokens):
                        out[i] = self._cut(list(tokens), args[i][1])
                    bar.update(len(idx))
        return out

