"""Content fingerprints of model and adapter files, each file hashed once per version on disk.

A fingerprint is the sha256 of a canonical list of `(relative path, size, sha256 of content)`
for the files of a directory, so two copies of the same files at different paths agree and a
changed byte anywhere changes it. Reading hundreds of GB on every engine start is not an
option, so each file's digest is remembered in a JSON file (`$XDG_CACHE_HOME/kvcache-vllm/`,
default `~/.cache/kvcache-vllm/`) under the file's identity on disk: real path, device, inode,
size, mtime and ctime in nanoseconds. Any write to a file changes its ctime, which no user can
set back, so a remembered digest is only reused for the bytes it was computed from. A file in
a Hugging Face hub cache is a link to `blobs/<sha256 of its content>` (the hub's LFS id); that
name is used as the digest without reading the file. Processes that start together (the
scheduler and every tensor-parallel worker) take a file lock, so one of them hashes and the
others read its result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger("vllm.kvcache")

_HUB_BLOB = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20
_MAX_REMEMBERED = 65536
_CACHE_NAME = "file-digests-v1.json"


def canonical_json(value: object) -> str:
    """The one JSON text of `value` that fingerprints and namespace strings are built from."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def default_cache_dir() -> Path:
    """Where file digests are remembered: `$XDG_CACHE_HOME/kvcache-vllm` or `~/.cache/...`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvcache-vllm"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(real: str, st: os.stat_result) -> str:
    return f"{real}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _hub_blob_digest(path: Path, real: str) -> str | None:
    """The content sha256 a hub-cache link names (`.../blobs/<sha256>`), else None."""
    if not path.is_symlink():
        return None
    target = Path(real)
    if target.parent.name == "blobs" and _HUB_BLOB.fullmatch(target.name):
        return target.name
    return None


def list_files(root: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The regular files under `root` (or `root` itself if it is a file), sorted, skipping
    hidden entries; only names ending in one of `suffixes` when given."""
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or (suffixes is not None and not name.endswith(suffixes)):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path)
    return sorted(found)


class FileDigests:
    """sha256 digests of files, remembered across processes by each file's identity on disk.

    `cache_dir=None` uses `default_cache_dir()`; if it cannot be written, digests are kept in
    this process only (said once in the log)."""

    def __init__(self, cache_dir: Path | None = None):
        self._dir = cache_dir if cache_dir is not None else default_cache_dir()
        self._known: dict[str, str] = {}
        self._lock = threading.Lock()
        self._disk_ok = True

    def fingerprint(self, root: Path, suffixes: tuple[str, ...] | None = None) -> str | None:
        """The fingerprint of the files under `root` (see the module doc), or None if there
        are none."""
        files = list_files(root, suffixes)
        if not files:
            return None
        base = root if root.is_dir() else root.parent
        digests = self.digests(files)
        entries = [
            [path.relative_to(base).as_posix(), path.stat().st_size, digest]
            for path, digest in zip(files, digests, strict=True)
        ]
        return hashlib.sha256(canonical_json(entries).encode()).hexdigest()

    def digests(self, files: list[Path]) -> list[str]:
        """The content sha256 of each file, in order."""
        with self._lock:
            keys, missing = self._lookup(files)
            if missing:
                with self._disk_lock():
                    self._load()
                    keys, missing = self._lookup(files)
                    if missing:
                        self._hash(files, keys, missing)
                        self._save()
            return [self._known[k] for k in keys]

    def _lookup(self, files: list[Path]) -> tuple[list[str], list[int]]:
        keys, missing = [], []
        for i, path in enumerate(files):
            real = os.path.realpath(path)
            key = _stat_key(real, os.stat(real))
            keys.append(key)
            if key not in self._known:
                blob = _hub_blob_digest(path, real)
                if blob is not None:
                    self._known[key] = blob
                else:
                    missing.append(i)
        return keys, missing

    def _hash(self, files: list[Path], keys: list[str], missing: list[int]) -> None:
        total = sum(os.stat(files[i]).st_size for i in missing)
        if total >= 1 << 30:
            logger.info(
                "kvcache: hashing %d files (%.1f GiB) once to fingerprint the model; digests are kept in %s",
                len(missing),
                total / (1 << 30),
                self._dir,
            )

        def one(i: int) -> tuple[int, str, bool]:
            real = os.path.realpath(files[i])
            digest = _sha256_of(Path(real))
            # A file written while it was read has a new identity: its digest is not kept.
            return i, digest, _stat_key(real, os.stat(real)) == keys[i]

        workers = max(1, min(4, os.cpu_count() or 1, len(missing)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvcache-hash") as pool:
            for i, digest, stable in pool.map(one, missing):
                if not stable:
                    raise RuntimeError(f"kvcache: {files[i]} changed while it was hashed; start again")
                self._known[keys[i]] = digest

    # -- the file the digests are remembered in --------------------------------------------------

    def _disk_lock(self):
        return _FileLock(self._dir / (_CACHE_NAME + ".lock")) if self._disk_ok else _NoLock()

    def _load(self) -> None:
        if not self._disk_ok:
            return
        try:
            remembered = json.loads((self._dir / _CACHE_NAME).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            logger.info("kvcache: ignoring the file digests in %s (%s)", self._dir, err)
            return
        if isinstance(remembered, dict):
            self._known = {**{str(k): str(v) for k, v in remembered.items()}, **self._known}

    def _save(self) -> None:
        if not self._disk_ok:
            return
        kept = dict(list(self._known.items())[-_MAX_REMEMBERED:])
        path = self._dir / _CACHE_NAME
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(canonical_json(kept))
            os.replace(tmp, path)
        except OSError as err:
            self._no_disk(err)

    def _no_disk(self, err: OSError) -> None:
        self._disk_ok = False
        logger.info("kvcache: cannot keep file digests in %s (%s); hashing in this process only", self._dir, err)


class _FileLock:
    """An exclusive `flock` on a file, made with its directory on first use."""

    def __init__(self, path: Path):
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as err:
            logger.info("kvcache: no lock on %s (%s); hashing without it", self._path, err)
            self._fd = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class _NoLock:
    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
