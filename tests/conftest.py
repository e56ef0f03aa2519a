"""Shared fixtures: an isolated cache/store per session, offline Hub, and configs composed like the CLI does."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported: without a GPU its kernels run in the interpreter (tests only)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# kvexp.run's CLI as a `python -c` program, so a test can run code first (python -c '<prelude><RUN_CLI>' args...)
RUN_CLI = "import sys\nfrom kvexp.run import main\nsys.exit(main(sys.argv[1:]))\n"


def free_port() -> int:
    """A loopback port nothing listens on (once this socket is closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No network and no user state: Hub offline, kvexp's cache (tiny model, calibrations) in a session dir."""
    cache = tmp_path_factory.mktemp("kvexp-cache")
    env = {"KVEXP_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache / "hf-datasets"),
           "TOKENIZERS_PARALLELISM": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh directory: mlruns/, outputs/ and multirun/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def compose(*overrides: str):
    from kvexp.preflight import compose_job

    return compose_job(list(overrides))


def make_spec(*overrides: str):
    from kvexp.resolve import validate

    return validate(compose("experiment=smoke", *overrides))


def build_engine(*overrides: str):
    from kvexp.engines import engine_class

    spec = make_spec(*overrides)
    engine = engine_class(spec.engine_options.name)(spec)
    engine.build()
    return engine


def save_checkpoint(model_cls, config, path):
    """A random HF checkpoint with weights ~N(0, 0.2): peaked, order-sensitive outputs (the default init's are
    near uniform, where numerical differences hide), plus the builtin tokenizer. Returns the HF model."""
    from kvexp.checkpoint import train_tokenizer

    torch.manual_seed(0)
    model = model_cls(config).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    train_tokenizer(config.vocab_size).save_pretrained(path)
    return model.eval()
