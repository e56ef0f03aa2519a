"""Calibration windows packed into batches: the same windows, the same statistics as one at a time."""
import torch

from conftest import build_engine
from kvexp.config import CalibConfig
from kvexp.quant import kv_calib
from kvexp.quant.calib import calibration_batches, rows_that_fit


def test_batches_hold_the_same_windows_in_order():
    engine = build_engine("quant=fp16")
    calib = CalibConfig(dataset="builtin", num_samples=7, seq_len=32)
    single = calibration_batches(engine.tokenizer, calib)
    packed = calibration_batches(engine.tokenizer, calib, batch_size=3)
    assert [tuple(b.shape) for b in single] == [(1, 32)] * 7
    assert [tuple(b.shape) for b in packed] == [(3, 32), (3, 32), (1, 32)]
    assert torch.equal(torch.cat(single), torch.cat(packed))


def test_kv_amax_batched_equals_one_window_at_a_time(monkeypatch):
    engine = build_engine("quant=fp16")
    calib = CalibConfig(dataset="builtin", num_samples=5, seq_len=48)
    windows = calibration_batches(engine.tokenizer, calib)
    cpu = torch.device("cpu")
    monkeypatch.setattr("kvexp.quant.calib.rows_that_fit", lambda *a, **k: 1)
    one = kv_calib.kv_amax(engine.model, windows, cpu)
    monkeypatch.setattr("kvexp.quant.calib.rows_that_fit", lambda *a, **k: 4)
    batched = kv_calib.kv_amax(engine.model, windows, cpu)
    for a, b in zip(one, batched):
        assert (a > 0).all() and torch.allclose(a, b, rtol=1e-5)


def test_rows_that_fit_uses_a_quarter_of_the_memory():
    assert rows_that_fit(torch.device("cpu"), 512, 1 << 20) == 1  # a 512 MiB window, a 2 GiB / 4 budget
    assert rows_that_fit(torch.device("cpu"), 512, 1 << 10) == 32  # capped
    assert rows_that_fit(torch.device("cpu"), 512, 1 << 16, cap=64) == (2 << 30) // 4 // (512 << 16)
