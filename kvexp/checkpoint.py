"""Where a model's files come from: a local HF checkpoint dir, the Hub (cached), or a builtin made offline.

Builtins are created deterministically on first use and cached, so the whole pipeline runs with no network:
`builtin:tiny` is a tiny random-weight Llama with a byte-level BPE tokenizer trained on text shipped with
kvexp; `builtin:organism` is a tiny Llama trained on the spot to recall what its context holds
(kvexp/organism.py), the one offline model whose accuracy means something.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from kvexp import organism
from kvexp.errors import ConfigError

if TYPE_CHECKING:
    from kvexp.config import RunSpec

log = logging.getLogger(__name__)
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
BUILTIN_PREFIX = "builtin:"
# Bump the version when a builtin's recipe changes, so cached copies are rebuilt.
BUILTINS = {
    "tiny": dict(version=1, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768),
    # Trained on first use (about 80 s on a 2-core CPU); its version carries its training recipe's hash.
    "organism": dict(version=organism.VERSION_TAG, max_position_embeddings=organism.ARCH["max_position_embeddings"]),
}
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def model_key(path: str) -> str:
    """What caches derived from a model (quantized weights, KV scales, fidelity references, the config hash) key
    on: its path, plus a builtin's version, so a builtin made from a new recipe does not reuse the old one's."""
    name = path[len(BUILTIN_PREFIX):] if path.startswith(BUILTIN_PREFIX) else None
    return f"{path}@v{BUILTINS[name]['version']}" if name in BUILTINS else path


def read_model_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def resolve_model(spec: RunSpec) -> Path:
    """The local directory holding config.json, *.safetensors and the tokenizer (creating/downloading it)."""
    path, revision = spec.cfg.model.path, spec.cfg.model.revision
    if path.startswith(BUILTIN_PREFIX):
        return _builtin(path[len(BUILTIN_PREFIX):], spec.cache_dir)
    local = Path(path).expanduser()
    if local.exists():
        _check_local(local, path)
        return local.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=_hub_offline()))
    except Exception as e:  # the Hub client raises many types (offline, gated, 404); all mean the same fix
        raise ConfigError(
            f"model.path={path}: could not get it from the Hugging Face Hub ({type(e).__name__}); "
            "check the id and your network/`huggingface-cli login`, or point model.path at a local checkpoint dir"
        ) from e


def check_model(spec: RunSpec) -> None:
    """Validation that needs no download: the path exists, and the context fits the model if its config is known."""
    path = spec.cfg.model.path
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise ConfigError(f"model.path={path}: unknown builtin; choose one of "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
        max_len = BUILTINS[name]["max_position_embeddings"]
    else:
        config = _local_or_cached_config(path, spec.cfg.model.revision)
        if config is None:
            return  # a Hub id not yet downloaded: checked after download, in the engine
        max_len = config.get("max_position_embeddings")
    check_context(spec, max_len)


def check_context(spec: RunSpec, max_len: int | None) -> None:
    ctx = spec.cfg.context
    if max_len and ctx.prompt_len + ctx.gen_len > max_len:
        raise ConfigError(
            f"context.prompt_len={ctx.prompt_len} + context.gen_len={ctx.gen_len} exceeds the {max_len}-token "
            f"context of model.path={spec.cfg.model.path}; use a shorter context or a longer-context model")


def _local_or_cached_config(path: str, revision: str | None) -> dict | None:
    local = Path(path).expanduser()
    if local.exists():
        _check_local(local, path)
        return read_model_config(local)
    if "/" not in path or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"model.path={path}: no such directory, and not a Hub id (owner/name)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def _check_local(local: Path, path: str) -> None:
    if not (local / "config.json").is_file():
        raise ConfigError(f"model.path={path}: no config.json there; point it at a Hugging Face checkpoint dir")
    if not any(local.glob("*.safetensors")):
        raise ConfigError(f"model.path={path}: no *.safetensors weights there (kvexp loads safetensors only)")
    try:
        json.loads((local / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.path={path}: config.json is not valid JSON ({e.msg} at line {e.lineno})") from e


def _builtin(name: str, cache_dir: Path) -> Path:
    recipe = BUILTINS[name]
    target = cache_dir / "models" / f"{name}-v{recipe['version']}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # parallel jobs: one creates, the others wait and reuse
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent))
            try:
                MAKERS[name](tmp, recipe)
            except BaseException:  # Ctrl-C mid-training included: no half-made model is left behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return target


def train_tokenizer(vocab_size: int):
    """Byte-level BPE trained on the shipped corpus: deterministic, offline, any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _make_tiny(out: Path, recipe: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(recipe["vocab_size"])
    arch = {k: v for k, v in recipe.items() if k != "version"}
    config = LlamaConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _train_organism(out: Path, _: dict) -> None:  # its recipe is kvexp.organism's
    log.info("builtin:organism: training it (once; about 80 s on a 2-core CPU), then cached in %s", out.parent)
    organism.train(out)


MAKERS = {"tiny": _make_tiny, "organism": _train_organism}
