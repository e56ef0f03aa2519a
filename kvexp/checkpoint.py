"""Where a model's files come from: a local HF checkpoint dir, the Hub (cached), or a builtin made offline.

Builtins are created deterministically on first use and cached, so the whole pipeline runs with no network:
`builtin:tiny` is a tiny random-weight Llama with a byte-level BPE tokenizer trained on text shipped with
kvexp; `builtin:organism` and `builtin:organism-long` are tiny Llamas trained to recall what their context holds
(kvexp/organism.py), shipped with kvexp: the offline models whose accuracy means something.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kvexp import artifacts, organism
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
    # Shipped (kvexp/data/<name>/); each version carries its training recipe's hash.
    **{name: dict(version=organism.version_tag(name), organism=name,
                  max_position_embeddings=recipe["arch"]["max_position_embeddings"])
       for name, recipe in organism.RECIPES.items()},
}
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


# The classes a failed connection raises across huggingface_hub's HTTP stacks (requests, httpx, httpx2) and the
# Hub client's own "not found"/"gated"/"offline" errors: what "could not reach it" means. Anything else (a full
# disk, a library bug) is not a network problem and is raised as it is.
_UNREACHABLE = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "RequestException",
                "OfflineModeIsEnabled", "LocalEntryNotFoundError", "RepositoryNotFoundError", "GatedRepoError",
                "RevisionNotFoundError", "HfHubHTTPError"}
OFFLINE_HINT = "offline, experiment=smoke (builtin:tiny) and experiment=organism run with no network"


def unreachable(exc: BaseException) -> bool:
    """True when exc means the Hub (or the network) could not give what was asked for."""
    return any(c.__name__ in _UNREACHABLE for c in type(exc).__mro__)


def hub_commit(path: str, revision: str | None) -> str:
    """The commit a Hub id (at revision, default main) resolves to: asked of the Hub, or read from the local
    Hugging Face cache when HF_HUB_OFFLINE is set. A model that cannot be reached is bad input (ConfigError)."""
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json", revision=revision)
        if isinstance(cached, str):
            return Path(cached).parent.name  # .../snapshots/<commit>/config.json
        raise ConfigError(f"model.path={path}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                          f"download it first or point model.path at a local checkpoint dir ({OFFLINE_HINT})")
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(path, revision=revision, timeout=15).sha
    except Exception as e:  # the Hub client raises many types; only those that mean "unreachable" are caught
        if not unreachable(e):
            raise
        raise ConfigError(f"model.path={path}: could not reach it on the Hugging Face Hub ({type(e).__name__}); "
                          f"check the id, the network and `hf auth login` for gated models, or point model.path at "
                          f"a local checkpoint dir ({OFFLINE_HINT})") from e


def model_fingerprint(path: str, revision: str | None, cache_dir: Path) -> str:
    """What the model *is*: a builtin's recipe version, a local checkpoint's file contents (sha256, remembered per
    file by size and mtime), or a Hub id's resolved commit. Keys the run hash and every derived artifact."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        return f"{path}@v{BUILTINS[name]['version']}"
    local = Path(path).expanduser()
    if local.exists():
        files = [f for f in local.iterdir() if f.is_file() and any(f.match(p) for p in HUB_PATTERNS)]
        return "sha256:" + artifacts.fingerprint(files, cache_dir / "fingerprints")
    return f"hub:{path}@{hub_commit(path, revision)}"


def hub_revision(spec: RunSpec) -> str:
    """The commit a Hub model's fingerprint (hub:<id>@<commit>) was resolved to at preflight."""
    return spec.build.model_fingerprint.rsplit("@", 1)[1]


def read_model_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def resolve_model(spec: RunSpec) -> Path:
    """The local directory holding config.json, *.safetensors and the tokenizer (creating/downloading it). A Hub
    model is fetched at the commit its fingerprint names, so the files are the ones the run hash was made of."""
    path = spec.cfg.model.path
    if path.startswith(BUILTIN_PREFIX):
        return _builtin(path[len(BUILTIN_PREFIX):], spec.cache_dir)
    if spec.build.model_dir is not None:
        _check_local(Path(spec.build.model_dir), path)
        return Path(spec.build.model_dir)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=hub_revision(spec), allow_patterns=HUB_PATTERNS,
                                      local_files_only=_hub_offline()))
    except Exception as e:  # only "unreachable" is the user's to fix; a full disk or a bug is raised as it is
        if not unreachable(e):
            raise
        raise ConfigError(f"model.path={path}: could not download it from the Hugging Face Hub "
                          f"({type(e).__name__}); check the network, or point model.path at a local checkpoint dir"
                          ) from e


def check_model(spec: RunSpec) -> None:
    """Validation that needs no download: the context fits the model, when its config is known here."""
    path = spec.cfg.model.path
    if path.startswith(BUILTIN_PREFIX):
        max_len = BUILTINS[path[len(BUILTIN_PREFIX):]]["max_position_embeddings"]
    elif spec.build.model_dir is not None:
        max_len = read_model_config(Path(spec.build.model_dir)).get("max_position_embeddings")
    else:
        config = _cached_hub_config(path, hub_revision(spec))
        if config is None:
            return  # a Hub model not downloaded yet: checked after download, in the engine
        max_len = config.get("max_position_embeddings")
    check_context(spec, max_len)


def check_context(spec: RunSpec, max_len: int | None) -> None:
    ctx = spec.cfg.context
    if max_len and ctx.prompt_len + ctx.gen_len > max_len:
        raise ConfigError(
            f"context.prompt_len={ctx.prompt_len} + context.gen_len={ctx.gen_len} exceeds the {max_len}-token "
            f"context of model.path={spec.cfg.model.path}; use a shorter context or a longer-context model")


def check_path(path: str) -> Path | None:
    """A builtin name, a usable local checkpoint dir (returned, resolved) or something shaped like a Hub id; any
    other value is one line naming model.path."""
    if path.startswith(BUILTIN_PREFIX):
        if path[len(BUILTIN_PREFIX):] not in BUILTINS:
            raise ConfigError(f"model.path={path}: unknown builtin; choose one of "
                              + ", ".join(BUILTIN_PREFIX + n for n in BUILTINS))
        return None
    local = Path(path).expanduser()
    if local.exists():
        _check_local(local, path)
        return local.resolve()
    if "/" not in path or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"model.path={path}: no such directory, and not a Hub id (owner/name)")
    return None


def _cached_hub_config(path: str, commit: str) -> dict | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=commit)
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
    """The builtin's directory, made once (parallel jobs wait for the one that makes it; a Ctrl-C mid-training
    leaves nothing) and checked against its manifest at every use."""
    recipe = BUILTINS[name]
    if name in organism.RECIPES and (shipped := organism.shipped(name)) is not None:
        return shipped
    target = cache_dir / "models" / f"{name}-v{recipe['version']}"
    return artifacts.cached(target, f"builtin:{name}", lambda tmp: MAKERS[name](tmp, recipe), lambda p: p)[0]


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


def _train_organism(out: Path, builtin: dict) -> None:
    """Only when the shipped weights are of another recipe than kvexp.organism's (it was edited, not retrained)."""
    name = builtin["organism"]
    log.warning("builtin:%s: its shipped weights are of another recipe; training this one (once, on the CPU), then "
                "cached in %s", name, out.parent)
    organism.train(out, organism.RECIPES[name])


MAKERS = {"tiny": _make_tiny, **dict.fromkeys(organism.RECIPES, _train_organism)}
