"""Shared fixtures: an isolated cache/store per session, offline Hub, and configs composed like the CLI does."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
    from kvexp.config import validate

    return validate(compose("experiment=smoke", *overrides))


def build_engine(*overrides: str):
    from kvexp.engines import engine_class

    spec = make_spec(*overrides)
    engine = engine_class(spec.engine_options.name)(spec)
    engine.build()
    return engine
