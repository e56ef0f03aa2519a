"""Bad input, one table: each case is one `kvexp: error:` line on stderr, a non-zero exit, and no half-written run.

Exit 2: rejected before anything ran (no store is even created). Exit 1: the job ran and failed; its run is FAILED
with its error, never left RUNNING.
"""
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import RUN_CLI, free_port, make_spec

from kvexp.tracking import TAG, Tracker

FAST = ["experiment=smoke", "eval=none", "eval.fidelity.enabled=false", "bench=none"]
# A full disk, simulated where an artifact's bytes are committed (os.fsync): the first artifact write fails
DISK_FULL = """
import errno, os
def disk_full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.fsync = disk_full
"""
NO_PERMISSION = DISK_FULL.replace("ENOSPC", "EPERM")  # a write the file system refuses (a root-owned directory)
AWQ = ["quant=awq"]  # the runs that read calibration text (so does quant=int8kv_static)


CASES = [  # id, overrides ({ckpt}: a dir of broken checkpoints), code run first, exit code, the line's pattern
    ("malformed override", ["context.gen_len=[8,"], "", 2, r"could not parse the overrides: no viable alternative"),
    ("unknown group option", ["quant=int9"], "", 2, r"quant=int9: unknown option; choose one of .*int8kv"),
    ("unknown field", ["context.gen_length=8"], "", 2, r"context\.gen_length: unknown field"),
    ("not a number", ["context.gen_len=abc"], "", 2, r"context\.gen_len=abc: .*could not be converted to Integer"),
    ("negative length", ["context.gen_len=-1"], "", 2, r"context\.gen_len=-1: must be a positive integer"),
    ("negative warmup", ["bench.warmup=-1"], "", 2, r"bench\.warmup=-1: must be >= 0"),
    ("longer than the model", ["context.prompt_len=40000"], "", 2, r"exceeds the 32768-token context"),
    ("not a choice", ["quant.kv_cache.dtype=int3"], "", 2, r"quant\.kv_cache\.dtype=int3: not one of auto, int8"),
    ("sweep without -m", ["quant=fp16,int8kv"], "", 2, r"a sweep \(a=x,y\) needs multirun: add -m"),
    ("missing checkpoint", ["model.path={ckpt}/nowhere"], "", 2, r"model\.path=\S+/nowhere: no such directory"),
    ("checkpoint without weights", ["model.path={ckpt}/no_weights"], "", 2, r"no \*\.safetensors weights there"),
    ("corrupt config.json", ["model.path={ckpt}/bad_config"], "", 2, r"bad_config: config\.json is not valid JSON"),
    # the engine finds these: the job's run is FAILED, the line names the stage and model.path
    ("corrupt weights", ["model.path={ckpt}/bad_weights"], "", 1, r"FAILED in build of model\.path=\S+/bad_weights"),
    ("missing tokenizer", ["model.path={ckpt}/no_tokenizer"], "", 1, r"FAILED in build of model\.path=\S+/no_tok"),
    ("corrupt tokenizer.json", ["model.path={ckpt}/bad_tokenizer"], "", 1, r"FAILED in build of model.path=\S+/bad_tok"),
    ("unreachable tracking server", ["tracking.uri=http://127.0.0.1:{port}"], "", 2,
     r"tracking\.uri=http://127\.0\.0\.1:\d+: cannot open the MLflow store \(Connection refused\); start the server"),
    ("unknown store scheme", ["tracking.uri=nosuch://store"], "", 2, r"not an MLflow store kvexp supports; use"),
    ("unwritable store", ["tracking.uri=sqlite:////proc/kvexp/mlflow.db"], "", 2, r"cannot create /proc/kvexp"),
    ("disk full", [], DISK_FULL, 1, r"job \S+ FAILED in setup: OSError: .*could not write artifact config\.yaml .*"
                                    r"No space left on device.*free space there"),
    ("write not permitted", [], NO_PERMISSION, 1,
     r"FAILED in setup: PermissionError: .*could not write artifact config\.yaml to \S+ \(Operation not permitted\); "
     r"permission denied: make it writable"),
    ("password in a database URI", ["tracking.uri=postgresql://kvexp:pw-0123@db/mlflow"], "", 2,
     r"tracking\.uri=postgresql://\*\*\*@db/mlflow: a password in a database URI .*PGPASSWORD"),
    ("calibration file missing", [*AWQ, "quant.calib.dataset={ckpt}/nowhere.txt"], "", 2,
     r"quant\.calib\.dataset=\S+/nowhere\.txt: not builtin, organism, .* or an existing \.txt/\.jsonl file"),
    ("calibration file empty", [*AWQ, "quant.calib.dataset={ckpt}/empty.txt"], "", 2,
     r"quant\.calib\.dataset=\S+/empty\.txt: no text in it"),
    ("calibration file binary", ["quant=int8kv_static", "quant.calib.dataset={ckpt}/binary.txt"], "", 2,
     r"quant\.calib\.dataset=\S+/binary\.txt: not UTF-8 text \(byte 0x\w\w at offset \d+\)"),
    ("calibration .jsonl without text", [*AWQ, "quant.calib.dataset={ckpt}/no_text.jsonl"], "", 2,
     r"quant\.calib\.dataset=\S+/no_text\.jsonl: each line of a \.jsonl file must be a JSON object with a \"text\""),
    ("unknown calibration set", [*AWQ, "quant.calib.dataset=c4"], "", 2, r"quant\.calib\.dataset=c4: not builtin"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Broken copies of the builtin tiny checkpoint, one dir per fault, and broken calibration files."""
    from kvexp.checkpoint import resolve_model

    good = resolve_model(make_spec())
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = ["tokenizer.json", "tokenizer_config.json"]
    layouts = {"no_weights": ["config.json", *tokenizer], "bad_config": ["model.safetensors", *tokenizer],
               "bad_weights": ["config.json", *tokenizer], "no_tokenizer": ["config.json", "model.safetensors"],
               "bad_tokenizer": ["config.json", "model.safetensors", *tokenizer]}
    for name, files in layouts.items():
        (root / name).mkdir()
        for f in files:
            shutil.copy(good / f, root / name / f)
    (root / "bad_config" / "config.json").write_text('{"model_type": "llama",')
    (root / "bad_weights" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    (root / "bad_tokenizer" / "tokenizer.json").write_text("<html>502 Bad Gateway</html>")  # a failed download
    (root / "empty.txt").write_text("\n\n  \n")  # calibration files: only blank lines, bytes that are not text
    (root / "binary.txt").write_bytes(b"calib " + bytes(range(128, 256)))
    (root / "no_text.jsonl").write_text('{"content": "a passage"}\n')
    return root


@pytest.mark.parametrize("args, prelude, code, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_no_half_written_run(args, prelude, code, pattern, ckpt, tmp_path):
    args = [a.format(ckpt=ckpt, port=free_port()) for a in args]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", prelude + RUN_CLI, *FAST, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kvexp: error: ") and re.search(pattern, lines[0]), lines
    store = tmp_path / "mlruns" / "mlflow.db"
    if code == 2:  # rejected up front, and fast (an unreachable server must not be retried for minutes)
        assert not store.exists() and time.monotonic() - start < 30
        return
    with sqlite3.connect(store) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    runs = Tracker(f"sqlite:///{store}", "kvexp").search()
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags[TAG + "error"].split("\n")[0] in lines[0]


def empty_db(cwd):
    (cwd / "mlruns").mkdir()
    (cwd / "mlruns" / "mlflow.db").touch()  # a failed copy or a truncation: every run gone


def copied_store(cwd):
    """A store made in another directory, then copied here: its experiment's artifacts are in the original."""
    original = cwd / "original"
    Tracker(f"sqlite:///{original}/mlruns/mlflow.db", "kvexp").prepare()
    shutil.copytree(original / "mlruns", cwd / "mlruns")


def garbage_db(cwd):
    (cwd / "mlruns").mkdir()
    (cwd / "mlruns" / "mlflow.db").write_bytes(bytes(range(256)) * 16)


def half_db(cwd):
    """A store cut in half (a copy that stopped)."""
    tracker = Tracker(f"sqlite:///{cwd}/mlruns/mlflow.db", "kvexp")
    tracker.end(tracker.start_run("r", {}), "FINISHED")
    db = cwd / "mlruns" / "mlflow.db"
    db.write_bytes(db.read_bytes()[:db.stat().st_size // 2])
    shutil.rmtree(cwd / "mlruns" / "artifacts", ignore_errors=True)


NOT_A_STORE = r"cannot open the MLflow store \(DatabaseError: .*\); point tracking\.uri at an MLflow store"


@pytest.mark.parametrize("make, pattern", [
    (garbage_db, NOT_A_STORE),
    (half_db, NOT_A_STORE),
    (empty_db, r"tracking\.uri=sqlite:///\S+/mlflow\.db: the file is empty \(0 bytes\), not an MLflow store; "
               r"restore it from a copy, or delete it to start a new store there"),
    (copied_store, r"experiment kvexp keeps its artifacts in \S+/original/mlruns/artifacts/kvexp, outside this "
                   r"store's directory \S+ \(a copied or moved store\); use the store at its original place"),
], ids=["garbage mlflow.db", "half a mlflow.db", "0-byte mlflow.db", "copied store"])
def test_a_broken_store_is_refused_and_left_as_it_was(make, pattern, tmp_path):
    make(tmp_path)
    db = tmp_path / "mlruns" / "mlflow.db"
    before = db.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "kvexp.run", *FAST], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kvexp: error: ") and re.search(pattern, lines[0]), lines
    assert db.read_bytes() == before
    assert not (tmp_path / "mlruns" / "artifacts").exists() and not (tmp_path / "outputs").exists()
