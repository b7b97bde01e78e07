"""Never a half-written output that looks complete: sibling + rename, a SHA-256 manifest, a shard writer."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from ..background import OneBehind
from ..errors import ModelLoadError, PrunequantError, RunError

log = logging.getLogger(__name__)

MANIFEST = "prunequant-manifest.json"
MANIFEST_VERSION = 1
CONFIG_MARK = "prunequant_export"  # a key of every export's config.json: tells our exports apart from others


class ExportError(PrunequantError):
    """A model or output location that cannot be exported as asked; the message says what to change."""


class OutputChangedError(ExportError, RunError):
    """The output directory appeared while we were writing it (someone else's): ours is not put in place."""


# ---- atomic output directory ------------------------------------------------------------------

@contextmanager
def atomic_output(out_dir: str | Path, overwrite: bool = False, manifest: bool = True):
    """Yield a temporary sibling directory; on success write the manifest and rename it to out_dir (atomic)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory; remove it or choose another")
    if out.exists() and not overwrite:
        raise ExportError(f"output directory {out} already exists; choose another one or pass overwrite=True")
    if not out.parent.is_dir():
        raise ExportError(f"parent directory {out.parent} of the output does not exist; create it first")
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        if out.exists() and not overwrite:  # it appeared while we were writing: never replace it silently
            raise OutputChangedError(f"{out} was created by someone else while this output was written; it was not "
                              "replaced. Choose another --out, or pass --overwrite and run again (it resumes)")
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- manifest ---------------------------------------------------------------------------------

def sha256_file(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


# hashes taken while an output was being written, by file identity (a rename keeps it; a rewrite does not)
_HASHED: dict[tuple[int, int, int, int], str] = {}


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def hash_written(path: str | Path) -> None:
    """Hash a file just written, on a writer thread: the manifest then only reads what it has not seen."""
    path = Path(path)
    ident = _identity(path)
    _HASHED[ident] = sha256_file(path)


def _hash_one(path: Path) -> str:
    h = _HASHED.pop(_identity(path), None)
    return h if h is not None else sha256_file(path)


def _hash_all(paths: list[Path]) -> list[str]:
    """SHA-256 of several files at once (hashlib releases the GIL: shards hash in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return [_hash_one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_hash_one, paths))


def write_manifest(root: str | Path) -> dict:
    root = Path(root)
    rels = _files(root)
    hashes = _hash_all([root / rel for rel in rels])
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": h} for rel, h in zip(rels, hashes)}
    manifest = {"prunequant_manifest": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(root: str | Path, full: bool = True) -> dict:
    """Check every file named in the manifest (size, and SHA-256 when ``full``); ModelLoadError otherwise."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{root} has no {MANIFEST}: it is not a complete prunequant export (an interrupted "
                             "save?); export it again, or pass verify=False to load it unchecked")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is unreadable ({e}); the export is damaged, export it again") from None
    for rel, want in sorted(files.items()):
        f = root / rel
        if not f.is_file():
            raise ModelLoadError(f"{f} is missing from the export (listed in {MANIFEST}); copy it again or re-export")
        size = f.stat().st_size
        if size != want["size"]:
            raise ModelLoadError(f"{f} is truncated or altered: {size} bytes, the manifest says {want['size']}; "
                                 "copy it again or re-export")
    if full:
        rels = sorted(files)
        for rel, h in zip(rels, _hash_all([root / rel for rel in rels])):
            if h != files[rel]["sha256"]:
                raise ModelLoadError(f"{root / rel} is altered: its SHA-256 differs from {MANIFEST}; copy it again "
                                     "or re-export")
    return manifest


RUN_RECORDS = ("prunequant.json", "prunequant-export.json")


def written_by_prunequant(root: str | Path) -> bool:
    """Does this directory come from prunequant (a run record, or our mark in config.json)?"""
    root = Path(root)
    if any((root / f).is_file() for f in RUN_RECORDS):
        return True
    try:
        return CONFIG_MARK in json.loads((root / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_integrity(root: str | Path, verify: bool = True) -> None:
    """Verify a local model directory against its manifest before use (docs/internals.md); ``verify=False`` warns."""
    root = Path(root)
    has_manifest = (root / MANIFEST).is_file()
    if not verify:
        if has_manifest or written_by_prunequant(root):
            log.warning("%s: integrity check skipped (--no-verify); its files may not be the ones evaluated", root)
        return
    if has_manifest:
        verify_manifest(root)
    elif written_by_prunequant(root):
        raise ModelLoadError(f"{root} was written by prunequant but has no {MANIFEST}, so its files cannot be "
                             "checked (deleted, or an incomplete copy); copy or export it again, or pass "
                             "--no-verify to use it unchecked")


# ---- sharded safetensors writing --------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '2GB', '500MB', '1.5GiB'."""
    if isinstance(size, int):
        if size <= 0:
            raise ExportError(f"max shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ExportError(f"cannot read size {size!r}: use e.g. '2GB', '500MB' or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ExportError(f"max shard size must be positive, got {size!r}")
    return value


SPLIT_MIN_BYTES = 64 * 2**20  # smaller outputs stay in one file


def _save_and_hash(save_file, tensors: dict, path: Path, metadata: dict) -> None:
    save_file(tensors, str(path), metadata=metadata)
    hash_written(path)


class ShardWriter:
    """Accumulate groups of tensors and write a safetensors shard on a worker thread per ``max_bytes``."""

    def __init__(self, root: Path, prefix: str = "model", max_bytes: int = 2 * 10**9,
                 metadata: dict | None = None):
        self.root, self.prefix, self.max_bytes = Path(root), prefix, max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_bytes = 0
        self._thread: OneBehind | None = None  # shards are written while the next one fills
        self.last_group: str | None = None  # key prefix of the last block (set_last_group)

    def set_last_group(self, prefix: str | None) -> None:
        """Give the tensors under ``prefix`` (the last block) a shard of their own when what precedes them is
        large: a streaming export then writes nearly everything while that block is still being compressed."""
        self.last_group = prefix

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        elif self.last_group is not None and any(k.startswith(self.last_group) for k in tensors) \
                and not any(k.startswith(self.last_group) for k in self.pending):
            self.split()
        for k, t in tensors.items():
            if k in self.pending or any(k in keys for _, keys in self.written):
                raise ExportError(f"tensor {k} written twice")
            self.pending[k] = t.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def split(self) -> None:
        """End the shard here unless it is small (a streaming export calls this before the last block)."""
        if self.pending_bytes >= SPLIT_MIN_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hand the pending tensors to the writer thread (after the shard before them is on disk)."""
        if not self.pending:
            return
        from safetensors.torch import save_file

        name = f"{self.prefix}.part{len(self.written) + 1:05d}.safetensors"
        self.written.append((name, list(self.pending)))
        if self._thread is None:
            self._thread = OneBehind("shard-writer")
        self._thread.submit(_save_and_hash, save_file, self.pending, self.root / name, self.metadata)
        self.pending, self.pending_bytes = {}, 0

    def abort(self) -> None:
        """Stop writing (the output is being discarded): wait for the shard in flight, drop the rest."""
        self.pending, self.pending_bytes = {}, 0
        if self._thread is not None:
            self._thread.drain()
            self._thread.close()
            self._thread = None

    @contextmanager
    def aborting(self):
        """Abort on any exception inside (so the output's removal never races a shard write)."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise

    def close(self) -> list[str]:
        self.flush()
        if self._thread is not None:
            self._thread.close()
            self._thread = None
        n = len(self.written)
        if n == 0:
            return []
        final, weight_map = [], {}
        for i, (tmp_name, keys) in enumerate(self.written, 1):
            name = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.root / tmp_name, self.root / name)
            final.append(name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.root / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return final


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor dtypes, shapes, byte offsets) without reading data."""
    header = _full_header(path)
    header.pop("__metadata__", None)
    return header


def _full_header(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e}); re-export it") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a readable safetensors file (bad header); re-export it")
    return header


def shard_files(root: Path, prefix: str) -> list[Path]:
    single = root / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    return sorted(root.glob(f"{prefix}-*-of-*.safetensors"))
