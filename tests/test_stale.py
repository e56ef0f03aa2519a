"""Results that cannot go stale (issue: a resolved build spec, content fingerprints, one artifacts module):
a changed model or calibration file is a new run and new artifacts; auto is resolved before hashing; a job's peak
memory is its own; a library error is not reported as a network problem; the core imports no experiment layer."""
from __future__ import annotations

import dataclasses
import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose, make_spec, save_checkpoint

from kvexp import artifacts, checkpoint
from kvexp.core import memory, spec as core_spec
from kvexp.errors import ConfigError


@pytest.fixture
def llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def write(seed: int):
        """The same architecture at the same path; seed 0 is save_checkpoint's weights, others add fresh noise."""
        from safetensors.torch import load_file, save_file

        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        out = tmp_path / "ckpt"
        save_checkpoint(LlamaForCausalLM, cfg, out)
        if seed:
            gen = torch.Generator().manual_seed(seed)
            state = load_file(str(out / "model.safetensors"))
            save_file({k: v + torch.randn(v.shape, generator=gen) * v.std() for k, v in state.items()},
                      str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    return write


def test_an_overwritten_checkpoint_is_a_new_run_with_new_int4_weights(llama_dir):
    """The same path with other weights: another run hash, and the RTN int4 artifact is rebuilt from the new
    weights (before: the path was the key, and the old model's int4 weights came back bit-identical)."""
    from safetensors.torch import load_file

    from kvexp.core.int4 import Int4Linear
    from kvexp.engines.torch_engine import TorchEngine
    from kvexp.quant import weights

    path = llama_dir(0)
    first = make_spec(f"model.path={path}", "quant=awq", "quant.weights.algo=rtn", "quant.weights.group_size=64")
    first_path, _ = weights.int4_weights(first, path, None, torch.device("cpu"))
    old = load_file(str(first_path))
    path = llama_dir(1)  # same directory, new weights
    second = make_spec(f"model.path={path}", "quant=awq", "quant.weights.algo=rtn", "quant.weights.group_size=64")
    assert second.build.model_fingerprint != first.build.model_fingerprint
    assert second.config_hash != first.config_hash
    engine = TorchEngine(second)
    engine.build()
    layer = engine.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4Linear)
    new_w = load_file(str(path / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"].float()
    rel = ((layer.dequantize() - new_w).norm() / new_w.norm()).item()
    assert rel < 0.2, rel  # int4 RTN of the NEW weights (the old ones would give ~1.4)
    key = "model.layers.0.mlp.down_proj.qweight"
    assert not torch.equal(old[key], load_file(str(weights.int4_weights(second, path, None, torch.device("cpu"))[0]))[key])


def test_a_calibration_file_edited_in_place_is_a_new_run(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the first calibration text\n\nand its second paragraph\n")
    overrides = ("quant=int8kv_static", f"quant.calib.dataset={text}")
    first = make_spec(*overrides)
    text.write_text("another text altogether\n\nwith other words\n")
    second = make_spec(*overrides)
    assert first.build.calib["source"] != second.build.calib["source"] and first.config_hash != second.config_hash
    assert make_spec("quant=int8kv", f"quant.calib.dataset={text}").build.calib is None  # nothing calibrated


def test_a_moved_hub_branch_is_a_new_run(monkeypatch):
    """revision=None names whatever main is: the hash follows the commit it resolves to."""
    from huggingface_hub import HfApi

    commits = iter(["a" * 40, "b" * 40])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo, revision=None, timeout=None:
                        type("Info", (), {"sha": next(commits)})())
    fps = [checkpoint.model_fingerprint("owner/model", None, Path("/tmp")) for _ in range(2)]
    assert fps == [f"hub:owner/model@{'a' * 40}", f"hub:owner/model@{'b' * 40}"]


def test_auto_is_resolved_before_hashing():
    """auto and what it resolves to here are one run; another machine or dtype is another."""
    base = make_spec("model.dtype=auto", "engine.device=auto")
    assert base.build.device == "cpu" and base.build.dtype == "float32"
    assert make_spec("model.dtype=float32", "engine.device=cpu").config_hash == base.config_hash
    assert make_spec("model.dtype=bfloat16").config_hash != base.config_hash


def test_the_int4_kernel_is_resolved_per_job_into_the_build_spec(monkeypatch):
    """engine.int4_kernel=auto becomes what will run: on an sm80+ GPU tinygemm at batch 1 in bf16 and the
    Triton kernel at batch 8 or in fp16 (two BuildSpecs, two runs); the reference on the CPU; 'none' without int4
    layers. What the user names is checked against the device and dtype at preflight."""
    from omegaconf import OmegaConf

    from kvexp.engines.torch_engine.engine import TorchEngine
    from kvexp.errors import UnsupportedConfig

    def resolved(*overrides, device="cpu", dtype=torch.bfloat16):
        cfg = compose("experiment=smoke", *overrides)
        options = TorchEngine.parse_options(OmegaConf.to_container(cfg, resolve=True)["engine"])
        return TorchEngine.resolve_options(options, OmegaConf.to_object(cfg), torch.device(device), dtype).int4_kernel

    awq = ("quant=awq", "quant.weights.algo=rtn")
    assert make_spec(*awq).build.options["int4_kernel"] == "reference"  # this CPU
    assert make_spec("quant=fp16").build.options["int4_kernel"] == "none"
    assert make_spec("quant=fp16", "quant.weights.lm_head=int4").build.options["int4_kernel"] == "reference"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolved(*awq, "bench.batch_size=1", device="cuda:0") == "tinygemm"
    assert resolved(*awq, "bench.batch_size=8", device="cuda:0") == "triton"
    assert resolved(*awq, "bench.batch_size=1", device="cuda:0", dtype=torch.float16) == "triton"
    assert resolved(*awq, "bench.batch_size=8", "engine.int4_kernel=tinygemm", device="cuda:0") == "tinygemm"
    with pytest.raises(UnsupportedConfig, match="engine.int4_kernel=tinygemm: needs model.dtype=bfloat16"):
        resolved(*awq, "engine.int4_kernel=tinygemm", device="cuda:0", dtype=torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert resolved(*awq, device="cuda:0", dtype=torch.float16) == "dequant"
    with pytest.raises(UnsupportedConfig, match="compute capability 8.0"):
        resolved(*awq, "engine.int4_kernel=triton", device="cuda:0", dtype=torch.float16)


def test_the_machine_and_the_numerics_version_are_in_the_hash(monkeypatch):
    from kvexp import resolve

    base = make_spec().config_hash
    monkeypatch.setattr(resolve, "device_name", lambda device: "NVIDIA H200")
    assert make_spec().config_hash != base
    monkeypatch.undo()
    monkeypatch.setattr(resolve, "NUMERICS_VERSION", core_spec.NUMERICS_VERSION + 1)
    assert make_spec().config_hash != base


def test_compare_pairs_a_run_only_with_a_baseline_of_its_machine():
    from kvexp.compare import Row, tables

    def row(quant, device):
        return Row(run_id=quant + device, name=quant, model="m", quant=quant, context="short", prompt_len=8,
                   gen_len=4, engine="torch", config_hash=quant + device, sweep_id="s",
                   metrics={"perf.decode_tok_s": 10.0}, model_id="sha256:x", machine=(device, "{}"))

    rows = [row("fp16", "NVIDIA H100"), row("int8kv", "NVIDIA H200")]
    tabs, notes = tables(rows, rows)
    speed = next(t for t in tabs if "tok/s" in t.headers)
    assert speed.cells[1][speed.headers.index("tok/s")] == "10"  # no "(1x)": the only fp16 ran on another GPU
    assert any("int8kv" in n and "NVIDIA H200" in n for n in notes)
    rows.append(row("fp16", "NVIDIA H200"))
    speed = next(t for t in tables(rows, rows)[0] if "tok/s" in t.headers)
    assert speed.cells[1][speed.headers.index("tok/s")] == "10 (1x)"


def test_two_jobs_in_one_process_do_not_share_a_peak():
    """The second job's peak is its own, not the first one's 1 GiB (ru_maxrss is the process's lifetime peak).
    Measured against this process's own resident memory, which a long test session has grown."""
    from conftest import build_engine

    cpu, gib = torch.device("cpu"), 1 << 30
    memory.reset_peak(cpu)
    base = memory.peak_bytes(cpu)
    big = torch.ones(gib // 4)  # 1 GiB, pages touched
    assert memory.peak_bytes(cpu) >= base + 0.9 * gib
    del big
    memory.reset_peak(cpu)
    engine = build_engine()
    assert engine.memory().peak_bytes < base + 0.5 * gib, (engine.memory().peak_bytes, base)


def test_a_full_disk_is_not_called_a_network_problem(monkeypatch):
    import huggingface_hub

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    spec = make_spec()
    spec = type(spec)(cfg=spec.cfg, engine_options=spec.engine_options, config_hash=spec.config_hash,
                      build=dataclasses.replace(spec.build, model_dir=None,
                                                          model_fingerprint="hub:owner/model@" + "c" * 40))
    spec.cfg.model.path = "owner/model"
    with pytest.raises(OSError, match="No space left"):
        checkpoint.resolve_model(spec)

    from kvexp.quant import calib

    monkeypatch.setattr("datasets.load_dataset", full)
    with pytest.raises(OSError, match="No space left"):
        calib._hub_texts("wikitext", 4)


def test_an_unreachable_hub_is_one_line_naming_what_runs_offline(monkeypatch):
    with pytest.raises(ConfigError, match="model.path=owner/model: not in the local Hugging Face cache.*"
                                          "experiment=smoke.*experiment=organism") as err:
        checkpoint.model_fingerprint("owner/model", None, Path("/tmp"))
    assert "\n" not in str(err.value)


def test_a_corrupt_artifact_is_rebuilt_not_loaded(tmp_path, caplog):
    dest = tmp_path / "a.bin"
    builds = []

    def build(tmp):
        builds.append(1)
        tmp.write_bytes(b"x" * 100)

    assert artifacts.cached(dest, "thing", build, lambda p: p.read_bytes()) == (b"x" * 100, True)
    assert artifacts.cached(dest, "thing", build, lambda p: p.read_bytes()) == (b"x" * 100, False)
    dest.write_bytes(b"x" * 50)  # truncated
    assert artifacts.cached(dest, "thing", build, lambda p: p.read_bytes()) == (b"x" * 100, True)
    assert len(builds) == 2 and "does not match its checksum" in caplog.text


def test_the_core_imports_no_experiment_layer():
    code = ("import sys, kvexp.core, kvexp.core.engine, kvexp.core.spec, kvexp.core.model, kvexp.core.decode, "
            "kvexp.core.kv, kvexp.core.int4, kvexp.core.memory, kvexp.core.kernels.decode_attention, "
            "kvexp.core.kernels.kv_write\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'mlflow', 'lm_eval'))\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_store_from_before_is_said_once_and_still_read(tmp_path):
    """Runs logged before run hashes covered the build: a note until this kvexp logs its first run there."""
    from kvexp.job import run_tags
    from kvexp.run import legacy_note
    from kvexp.tracking import TAG, Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "kvexp")
    assert legacy_note(tracker) is None  # an empty store: nothing to say
    old = tracker.start_run("old", {TAG + "config_hash": "a" * 64})
    tracker.end(old, "FINISHED")
    assert "the 1 run(s) in this store predate" in legacy_note(tracker)
    assert tracker.find_finished("a" * 64) is not None  # still found
    new = tracker.start_run("new", run_tags(make_spec()))
    tracker.end(new, "FINISHED")
    assert legacy_note(tracker) is None
