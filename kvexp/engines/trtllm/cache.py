"""Where engine=trtllm keeps what it builds: engines keyed by a build hash, and calibration text in the layout
TensorRT-LLM 1.x can read from a local directory.

Layout under the kvexp cache dir:  trtllm/engines/<build key[:16]>/   (config.json + rank0.engine, from LLM.save)
                                   trtllm/calib/<calib key[:16]>/lambada_layout/{train,validation}.jsonl
"""
from __future__ import annotations

import json
from pathlib import Path

from kvexp import artifacts
from kvexp.config import CalibConfig
from kvexp.errors import ConfigError

# TensorRT-LLM 1.x reads calibration text along two code paths, and only a local directory satisfies both:
# - ModelOpt flow (AWQ, FP8, FP8 KV; tensorrt_llm/quantization/quantize_by_modelopt.py get_calib_dataloader): a
#   local dir is read as load_dataset(dir, split="train")["text"] unless its path contains "cnn_dailymail" or
#   "scienceqa"/"science_qa", which switch to those datasets' own columns.
# - Legacy convert flow (INT8 KV with unquantized weights; tensorrt_llm/models/<model>/convert.py quantize ->
#   tensorrt_llm/models/convert_utils.py load_calib_dataset): split and column come only from
#   DEFAULT_HF_DATASET_META, matched by substring of the path; "lambada" maps to split "validation", column "text".
# So kvexp writes the same rows as train.jsonl and validation.jsonl under a directory whose name contains "lambada".
CALIB_LEAF = "lambada_layout"
CALIB_PATH_TRAPS = ("cnn_dailymail", "scienceqa", "science_qa")
# The legacy flow's capture_activation_range reads 512 rows by default (tensorrt_llm/models/llama/convert.py in 1.0)
# and fails on an empty slice when there are fewer; the windows are cycled up to this many rows.
CALIB_MIN_ROWS = 512
LOCAL_CALIB_SUFFIXES = (".txt", ".jsonl")


def engine_dir(cache_root: Path, build_key: str) -> Path:
    return cache_root / "trtllm" / "engines" / build_key[:16]


def is_local_calib(dataset: str) -> bool:
    return dataset.endswith(LOCAL_CALIB_SUFFIXES)


def calib_dir(cache_root: Path, key: str) -> Path:
    path = cache_root / "trtllm" / "calib" / key[:16] / CALIB_LEAF
    trap = next((t for t in CALIB_PATH_TRAPS if t in str(path).lower()), None)
    if trap:
        raise ConfigError(f"cache_dir={cache_root}: its path contains '{trap}', which makes TensorRT-LLM read "
                          "calibration data as that Hub dataset; choose another cache_dir")
    return path


def write_calib_dir(calib: CalibConfig, tokenizer, target: Path) -> Path:
    """The windows engine=torch calibrates on (kvexp.quant.calib.calibration_batches: num_samples x seq_len tokens
    of the same text), decoded to text one row each and cycled to CALIB_MIN_ROWS; written once per key.
    TensorRT-LLM re-tokenizes the rows, so its windows match kvexp's up to tokenizer round-trip differences."""
    from kvexp.quant.calib import calibration_batches

    def build(tmp: Path) -> None:
        windows = [tokenizer.decode(w[0].tolist()) for w in calibration_batches(tokenizer, calib)]
        rows = [windows[i % len(windows)] for i in range(max(CALIB_MIN_ROWS, len(windows)))]
        body = "".join(json.dumps({"text": t}) + "\n" for t in rows)
        tmp.mkdir()
        for split in ("train", "validation"):
            (tmp / f"{split}.jsonl").write_text(body)

    return artifacts.cached(target, "TensorRT-LLM calibration text", build, lambda p: p)[0]


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


def save_engine(llm, target: Path) -> None:
    """llm.save() into a temp dir next to target, then rename: a crash never leaves a half-written cached engine."""
    with artifacts.atomic(target) as tmp:
        llm.save(str(tmp))
