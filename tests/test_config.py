"""Composition, the config hash, and validation: every bad value is one line naming the field."""
import subprocess
import sys

import pytest

from conftest import compose, make_spec
from kvexp.resolve import validate
from kvexp.errors import ConfigError
from kvexp.preflight import group_options, plan


@pytest.mark.parametrize("group", ["model", "quant", "context", "engine", "eval", "bench", "tracking", "experiment"])
def test_every_preset_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        cfg = compose(f"{group}={option}")
        if group not in ("experiment", "tracking"):
            assert cfg[group].name == option  # a preset's name is its file name


def test_hash_ignores_order_and_composition_route():
    a = compose("quant=int8kv", "context.prompt_len=256", "experiment=smoke")
    b = compose("experiment=smoke", "context.prompt_len=256", "quant=int8kv")
    # the experiment file vs the same values given as overrides
    c = compose("model=tiny", "quant=int8kv", "eval=quick", "model.dtype=float32", "quant.calib.dataset=builtin",
                "quant.calib.num_samples=8", "quant.calib.seq_len=128", "context.prompt_len=256", "context.gen_len=32",
                "eval.fidelity.num_prompts=2", "eval.fidelity.score_tokens=16", "eval.fidelity.gen_tokens=8",
                "bench.warmup=1", "bench.iters=2")
    assert validate(a).config_hash == validate(b).config_hash == validate(c).config_hash


def test_hash_ignores_where_not_what():
    base = make_spec().config_hash
    assert make_spec("tracking.uri=http://127.0.0.1:5000", "force=true", "cache_dir=/elsewhere").config_hash == base
    assert make_spec("quant=int8kv").config_hash != base
    assert make_spec("context.prompt_len=65").config_hash != base


@pytest.mark.parametrize("overrides,field", [
    (["quant=nope"], "quant=nope"),
    (["context.prompt_len=-5"], "context.prompt_len=-5"),
    (["context.prompt_len=0"], "context.prompt_len=0"),
    (["context.prompt_len=40000"], "context.prompt_len=40000"),  # past the tiny model's 32k context
    (["context.prompt_lenn=5"], "context.prompt_lenn"),
    (["context.prompt_len=abc"], "context.prompt_len=abc"),
    (["model.path=/no/such/dir"], "model.path=/no/such/dir"),
    (["model.path=builtin:huge"], "model.path=builtin:huge"),
    (["quant.kv_cache.dtype=int3"], "quant.kv_cache.dtype=int3"),
    (["quant.kv_cache.granularity=head"], "quant.kv_cache.granularity=head"),
    (["quant=fp8", "engine=hf"], "quant.weights"),  # fp8 weights: not on engine=hf, names the engines that have them
    (["engine.device=tpu"], "engine.device=tpu"),
    (["engine.nope=1"], "engine.nope"),
    (["engine.int4_kernel=fast"], "engine.int4_kernel=fast"),
    (["engine.int4_kernel=reference"], "engine.int4_kernel=reference"),  # what auto resolves to, not an input
    (["quant=awq", "quant.weights.algo=rtn", "engine.int4_kernel=tinygemm"], "engine.int4_kernel=tinygemm"),  # CPU
    (["quant=fp16,int8kv"], "-m"),  # a sweep without multirun
    (["eval.tasks=[kvexp_paskey]"], "kvexp_passkey"),  # an unknown task: close matches, before any build
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        plan(["experiment=smoke", *overrides])
    message = str(err.value)
    assert field in message and "\n" not in message


def test_unsupported_quant_names_the_engines_that_support_it():
    with pytest.raises(ConfigError, match="engine=torch"):
        make_spec("quant=fp8", "engine=hf")


def test_missing_checkpoint_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="safetensors"):
        make_spec(f"model.path={tmp_path}")


def test_cli_error_is_one_line_and_nonzero(in_tmp):
    proc = subprocess.run([sys.executable, "-m", "kvexp.run", "experiment=smoke", "context.prompt_len=-1"],
                          capture_output=True, text=True, cwd=in_tmp, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["kvexp: error: context.prompt_len=-1: must be a positive integer"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (in_tmp / "mlruns").exists()  # nothing tracked, nothing built


def test_sweep_plan_expands_every_job():
    p = plan(["-m", "experiment=smoke", "quant=fp16,int8kv,awq", "context.gen_len=8,16"])
    assert len(p.specs) == 6 and len({s.config_hash for s in p.specs}) == 6
