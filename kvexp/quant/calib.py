"""Calibration data: text from the Hub, a local file, the corpus shipped with kvexp, or the model organism's
task documents, cut into token windows."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kvexp import organism
from kvexp.checkpoint import unreachable
from kvexp.config import CalibConfig, QuantConfig
from kvexp.errors import ConfigError

# name -> (load_dataset args, split, text field). cnn_dailymail is TensorRT-LLM's and ModelOpt's default.
HUB_DATASETS = {
    "cnn_dailymail": (("abisee/cnn_dailymail", "3.0.0"), "train", "article"),
    "wikitext": (("Salesforce/wikitext", "wikitext-2-raw-v1"), "train", "text"),
}
BUILTIN = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"


def calibration_texts(calib: CalibConfig) -> list[str]:
    name = calib.dataset
    if name == "builtin":
        return BUILTIN.read_text().splitlines()
    if name == "organism":  # the model organism's training distribution, the only text its vocabulary spells
        return organism.documents(calib.num_samples, calib.seq_len, seed="calib")
    if name in HUB_DATASETS:
        return _hub_texts(name, calib.num_samples)
    return _file_texts(name)


def needs_calib(quant: QuantConfig) -> bool:
    """Whether building this quantization reads calibration text: AWQ weights, static KV or activation scales."""
    return quant.weights.algo == "awq" or (quant.kv_cache.dtype != "auto" and quant.kv_cache.scale == "static") \
        or (quant.activations.dtype != "auto" and quant.activations.scale == "static")


def check_calib(calib: CalibConfig) -> None:
    """Preflight: a local calibration file exists and holds UTF-8 text (ConfigError naming quant.calib.dataset).
    The builtin and organism sources are shipped; the Hub's are checked when loaded (that needs the network)."""
    if calib.dataset not in ("builtin", "organism", *HUB_DATASETS):
        _file_texts(calib.dataset)


def _file_texts(name: str) -> list[str]:
    """The passages of a local .txt file (blank-line separated) or the "text" fields of a .jsonl file."""
    field = f"quant.calib.dataset={name}"
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}: not builtin, organism, {', '.join(HUB_DATASETS)}, or an existing .txt/.jsonl "
                          "file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); give a "
                          ".txt or .jsonl file of text") from e
    except OSError as e:
        raise ConfigError(f"{field}: cannot read it ({e.strerror})") from e
    if path.suffix == ".jsonl":
        try:
            texts = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f'{field}: each line of a .jsonl file must be a JSON object with a "text" field '
                              f"({type(e).__name__}: {e})") from e
    else:
        texts = [p for p in text.split("\n\n") if p.strip()]
    if not any(t.strip() for t in texts):
        raise ConfigError(f"{field}: no text in it; give a file with the text to calibrate on")
    return texts


def _hub_texts(name: str, n: int) -> list[str]:
    from datasets import load_dataset

    args, split, field = HUB_DATASETS[name]
    try:
        ds = load_dataset(*args, split=f"{split}[:{max(4 * n, 256)}]")
    except Exception as e:  # only "unreachable" is the user's to fix; a full disk or a bug is raised as it is
        if not unreachable(e):
            raise
        raise ConfigError(f"quant.calib.dataset={name}: could not load it from the Hub ({type(e).__name__}); "
                          "use quant.calib.dataset=builtin or a local .txt/.jsonl file offline") from e
    return [t for t in ds[field] if t and t.strip()]


def calibration_batches(tokenizer, calib: CalibConfig, batch_size: int = 1) -> list[torch.Tensor]:
    """num_samples windows of seq_len tokens cut from the concatenated texts (repeated if the source is
    short, so small offline sources still give full windows), packed batch_size to a tensor: a list of
    [<= batch_size, seq_len] (every window is full, so no padding or masks)."""
    ids: list[int] = []
    for text in calibration_texts(calib):
        ids.extend(tokenizer.encode(text + "\n", add_special_tokens=False))
    if not ids:
        raise ConfigError(f"quant.calib.dataset={calib.dataset}: no text in it")
    need = calib.num_samples * calib.seq_len
    ids = (ids * (need // len(ids) + 1))[:need]
    return list(torch.tensor(ids).view(calib.num_samples, calib.seq_len).split(batch_size))


def rows_that_fit(device: torch.device, seq_len: int, bytes_per_token: int, cap: int = 32) -> int:
    """Calibration windows per forward: a quarter of the device's free memory (2 GiB on a CPU) over the
    activations one window keeps alive, at most cap (beyond that a forward is long enough to hide launches)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2 << 30
    return max(1, min(cap, free // 4 // (seq_len * bytes_per_token)))
