"""The one owner of kvexp's on-disk cache: artifact keys, file locks, atomic writes, checksums, content fingerprints.

Every derived artifact (int4 weights, KV scales, fidelity references, builtin models, generated tasks, TensorRT-LLM
engines and calibration dirs) lives at <cache>/<kind>/<key[:16]><suffix>, its key the digest of exactly what
determines it (parts of the run's BuildSpec), so a changed model file or calibration text can never be served the
old result. Writers hold a lock beside the artifact, build into a temporary name in the same directory and rename
it into place, so a killed job never leaves a half-written artifact and parallel jobs build it once. Every file
artifact carries a sha256 sidecar (<name>.sha256) checked on each read, every directory artifact a manifest of its
files' digests: a truncated or corrupt artifact is reported once, removed and rebuilt, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from filelock import FileLock

log = logging.getLogger("kvexp")
T = TypeVar("T")
PARTIAL = ".kvexp-partial-"  # a temporary name; only complete artifacts get their real name
MANIFEST = ".kvexp-manifest.json"  # a directory artifact's {relative path: sha256}
CHUNK = 1 << 24


def digest(data: Any) -> str:
    """sha256 of canonical JSON: key order does not matter; paths and other objects by their str()."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def path(root: Path, kind: str, key: dict, suffix: str = "") -> Path:
    """Where the artifact of this kind and key lives (nothing is created)."""
    return Path(root) / kind / f"{digest({'kind': kind, **key})[:16]}{suffix}"


def file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@contextmanager
def locked(target: Path) -> Iterator[None]:
    """Held by the one process that builds target; the others wait, then find it built."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        yield


def _sync_tree(p: Path) -> None:
    for f in [p] if p.is_file() else (q for q in p.rglob("*") if q.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())  # a full disk often reports only here, with delayed allocation


@contextmanager
def atomic(dest: Path) -> Iterator[Path]:
    """A temporary path beside dest to write a file or a directory into; renamed over dest when the block ends
    without error (after an fsync), removed when it raises (Ctrl-C included)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{PARTIAL}{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        _sync_tree(tmp)
        if dest.is_dir() and tmp.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(dest: Path, data: bytes) -> None:
    with atomic(dest) as tmp:
        tmp.write_bytes(data)


# ---- checksums ----
def _sidecar(file: Path) -> Path:
    return file.with_name(file.name + ".sha256")


def _expected(dest: Path) -> dict[str, str]:
    """{relative path: sha256} as written with the artifact (a directory's manifest, a file's sidecar)."""
    if dest.is_dir():
        return json.loads((dest / MANIFEST).read_text())
    return {dest.name: _sidecar(dest).read_text().strip()}


def _actual(dest: Path) -> dict[str, str]:
    if dest.is_dir():
        return {p.relative_to(dest).as_posix(): file_sha256(p) for p in sorted(dest.rglob("*"))
                if p.is_file() and p.name != MANIFEST}
    return {dest.name: file_sha256(dest)}


def _seal(tmp: Path, name: str) -> None:
    """Write the checksums of a finished artifact: a manifest inside a directory, a sidecar beside a file."""
    sums = _actual(tmp)
    if tmp.is_dir():
        (tmp / MANIFEST).write_text(json.dumps(sums, indent=0, sort_keys=True))
    else:
        write_bytes(tmp.parent / f"{name}.sha256", (sums[tmp.name] + "\n").encode())


def verified(dest: Path, what: str) -> bool:
    """True when dest exists and matches its checksums; a corrupt or unsealed one is logged, removed, False."""
    if not dest.exists():
        return False
    try:
        ok = _expected(dest) == _actual(dest)
    except (OSError, ValueError):  # no sidecar/manifest (a crash between rename and seal), unreadable JSON
        ok = False
    if not ok:
        log.warning("cached %s at %s does not match its checksum (truncated or corrupt): rebuilding it", what, dest)
        remove(dest)
    return ok


def remove(dest: Path) -> None:
    if dest.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
    else:
        dest.unlink(missing_ok=True)
        _sidecar(dest).unlink(missing_ok=True)


def cached(dest: Path, what: str, build: Callable[[Path], None], load: Callable[[Path], T]) -> tuple[T, bool]:
    """(load(dest), whether it was built now). build(tmp) writes the artifact (a file, or a directory) at tmp;
    it runs once across processes, under dest's lock, and only when no verified copy exists. A copy that
    verifies but fails to load (a format from an older kvexp) is rebuilt the same way."""
    if verified(dest, what):
        try:
            return load(dest), False
        except Exception as e:  # any loader error means the same: this copy cannot be used
            log.warning("cached %s at %s cannot be loaded (%s): rebuilding it", what, dest, type(e).__name__)
            remove(dest)
    with locked(dest):
        if verified(dest, what):  # built by another process while this one waited for the lock
            return load(dest), False
        with atomic(dest) as tmp:
            build(tmp)
            _seal(tmp, dest.name)
    return load(dest), True


# ---- content fingerprints ----
def fingerprint(files: list[Path], memo_dir: Optional[Path] = None) -> str:
    """sha256 over the names and contents of files: what a model checkpoint or a calibration file *is*, wherever
    it is stored. A file's digest is remembered under memo_dir keyed by (path, size, mtime, inode), so a
    multi-GB checkpoint is read once, not at every preflight."""
    items = []
    for f in sorted(files, key=lambda p: p.name):
        items.append((f.name, _memo_sha256(f.resolve(), memo_dir)))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _memo_sha256(file: Path, memo_dir: Optional[Path]) -> str:
    st = file.stat()
    stamp = [str(file), st.st_size, st.st_mtime_ns, st.st_ino]
    memo = memo_dir / f"{digest(stamp)[:24]}.sha256" if memo_dir else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    value = file_sha256(file)
    if memo is not None:
        write_bytes(memo, (value + "\n").encode())
    return value
