"""The on-disk kernel cache: generated kernel source and tuning decisions, content-addressed.

Layout: ``ROOT/<kind>/<key>.py`` for text (kernel source, importable as is) and ``ROOT/<kind>/<key>.json``
for JSON (tuning choices). ROOT is, first found: ``Cache(root)`` / ``CompileConfig.cache_dir``, the
``KILN_CACHE_DIR`` environment variable (read when the cache is opened), ``platformdirs.user_cache_dir("kiln")``.

A key is the sha256 of a canonical JSON of everything that determines the entry (``key(fingerprint(dev),
source, dtype, ...)``), so an entry never goes stale: a change makes a new key. Every entry carries the
sha256 of its body (a ``# kiln-cache ...`` comment line for text, an envelope for JSON); a truncated,
empty or foreign file reads as a miss and is rebuilt. Writes go to a temp file in the same directory and
appear with ``os.replace``; ``get_or_create`` builds under a per-key file lock, so processes compiling the
same thing at once build it once and all read the one entry. Deleting ROOT at any time is safe (not while a
compile runs in another process: it would only rebuild, but a lock file may vanish under a waiter).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Callable

import filelock
import platformdirs

from ..errors import KilnError
from ..version import versions

ENV_VAR = "KILN_CACHE_DIR"
FORMAT = 1
_KIND = re.compile(r"[a-z][a-z0-9_]*\Z")
_KEY = re.compile(r"[0-9a-f]{64}\Z")
_HEADER = re.compile(rb"# kiln-cache v(\d+) sha256=([0-9a-f]{64})\n")
_SUFFIX = {"text": ".py", "json": ".json"}


def _canon(obj):
    # only values with a stable, address-free text form may enter a key
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "torch" and type(obj).__name__ in ("dtype", "device"):
        return str(obj)
    raise TypeError(f"cache key part of type {type(obj).__name__} has no canonical form: {obj!r}")


def key(*parts) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``: str / int / float / bool / None, lists, tuples,
    dicts, sets, paths, torch dtypes / devices / Sizes. Dict order does not matter; tuple == list."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_canon, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _arch(device: str) -> dict:
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return {"device": dev.type}
    major, minor = torch.cuda.get_device_capability(dev)
    return {"device": "cuda", "arch": f"sm_{major}{minor}", "name": torch.cuda.get_device_name(dev)}


def fingerprint(device=None) -> dict:
    """What every kernel / tuning key should include: kiln, torch, triton, python versions and the
    device's kind and GPU architecture (``device``: "cpu", "cuda", "cuda:1", a torch.device; None: cpu)."""
    return {**versions(), **_arch(str(device or "cpu")), "cache_format": FORMAT}


def default_root() -> Path:
    """``KILN_CACHE_DIR`` if set (read now, not at import), else the platform's user cache dir."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("kiln"))


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class _NoBytecodeLoader(importlib.machinery.SourceFileLoader):
    # keep __pycache__ out of the cache dir: generated modules are small, compiling them is cheap
    def set_data(self, path, data, *, _mode=0o666):
        pass


class Cache:
    """A kernel / tuning cache rooted at ``root`` (see the module docstring for the default)."""

    def __init__(self, root: str | os.PathLike | None = None, *, lock_timeout: float = 600.0):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.lock_timeout = lock_timeout
        self.counts = {"hits": 0, "misses": 0, "rebuilt": 0}  # this process, for the compile report

    @classmethod
    def from_config(cls, config) -> "Cache":
        """The cache a compile with ``config`` (a CompileConfig, or None) uses."""
        return cls(getattr(config, "cache_dir", None))

    # -- paths ------------------------------------------------------------------------------------------
    def path_for(self, kind: str, key: str, fmt: str = "text") -> Path:
        """Where the (kind, key) entry of format ``fmt`` ("text" or "json") lives."""
        if not _KIND.match(kind):
            raise KilnError(f"cache kind {kind!r} is not a lowercase identifier")
        if not _KEY.match(key):
            raise KilnError(f"cache key {key!r} is not a sha256 hex digest", hint="make keys with kiln.codegen.cache.key(...)")
        return self.root / kind / (key + _SUFFIX[fmt])

    def _writable_error(self, path: Path, err: OSError) -> KilnError:
        return KilnError(f"the kiln cache directory {self.root} is not writable ({path}: {err.strerror or err})",
                         hint=f"set {ENV_VAR} (or CompileConfig.cache_dir) to a writable directory")

    # -- read / write -----------------------------------------------------------------------------------
    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
            return None

    def get_text(self, kind: str, key: str) -> str | None:
        """The text stored under (kind, key), or None when absent or corrupt."""
        raw = self._read(self.path_for(kind, key, "text"))
        m = _HEADER.match(raw) if raw is not None else None
        if m is None or int(m[1]) != FORMAT or _digest(raw[m.end():]) != m[2].decode():
            return None
        try:
            return raw[m.end():].decode()
        except UnicodeDecodeError:
            return None

    def get_json(self, kind: str, key: str):
        """The JSON value stored under (kind, key), or None when absent or corrupt."""
        raw = self._read(self.path_for(kind, key, "json"))
        try:
            env = json.loads(raw) if raw is not None else None
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(env, dict) or env.get("kiln_cache") != FORMAT or "value" not in env:
            return None
        if env.get("sha256") != _digest(_dumps(env["value"]).encode()):
            return None
        return env["value"]

    def put_text(self, kind: str, key: str, text: str) -> Path:
        """Store ``text`` under (kind, key), atomically; returns the entry's path."""
        body = text.encode()
        return self._write(self.path_for(kind, key, "text"), b"# kiln-cache v%d sha256=%s\n" % (FORMAT, _digest(body).encode()) + body)

    def put_json(self, kind: str, key: str, value) -> Path:
        """Store a JSON-serializable ``value`` under (kind, key), atomically; returns the entry's path."""
        body = _dumps(value)
        env = {"kiln_cache": FORMAT, "sha256": _digest(body.encode()), "value": json.loads(body)}
        return self._write(self.path_for(kind, key, "json"), json.dumps(env, indent=1, sort_keys=True).encode())

    def _write(self, path: Path, data: bytes) -> Path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise self._writable_error(path.parent, e) from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; entries are plain files like any cache's
            os.replace(tmp, path)  # readers see the old entry or the whole new one, never a part
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise self._writable_error(path, e) from e
            raise
        return path

    def _get(self, kind: str, key: str):
        text = self.get_text(kind, key)
        return text if text is not None else self.get_json(kind, key)

    def get_or_create(self, kind: str, key: str, build: Callable[[], "str | dict | list"]):
        """The entry under (kind, key); on a miss, ``build()`` it (a str is stored as text, anything else
        as JSON) under a per-key file lock, so that concurrent processes build it once. The value returned
        on a miss equals what a later hit returns (JSON round-tripped: tuples come back as lists)."""
        found = self._get(kind, key)
        if found is not None:
            self.counts["hits"] += 1
            return found
        lock_path = self.root / ".locks" / f"{kind}-{key}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(lock_path, timeout=self.lock_timeout)
            lock.acquire()
        except filelock.Timeout as e:
            raise KilnError(f"timed out after {self.lock_timeout:.0f} s waiting for the cache lock {lock_path}",
                            hint="another kiln process is building this entry; if none is, delete the lock file") from e
        except OSError as e:
            raise self._writable_error(lock_path.parent, e) from e
        try:
            found = self._get(kind, key)  # another process may have built it while we waited
            if found is not None:
                self.counts["hits"] += 1
                return found
            exists = any(self.path_for(kind, key, f).exists() for f in _SUFFIX)
            self.counts["rebuilt" if exists else "misses"] += 1
            value = build()
            if value is None:  # None is what a miss reads as: it could never hit
                raise KilnError(f"the build for cache entry {kind}/{key} returned None")
            if isinstance(value, str):
                self.put_text(kind, key, value)
                return value
            self.put_json(kind, key, value)
            return json.loads(_dumps(value))
        finally:
            lock.release()

    # -- modules ----------------------------------------------------------------------------------------
    def load_module(self, kind: str, key: str) -> types.ModuleType:
        """Import the text entry (kind, key), which kiln generated itself, as a Python module. Loading the
        same entry again returns the same module (Triton keeps its compiled kernels per function object).
        Never use this on source that came from an artifact or anywhere but kiln's own codegen."""
        path = self.path_for(kind, key, "text")
        name = f"_kiln_{kind}_{key}"
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None) == str(path):
            return mod
        if self.get_text(kind, key) is None:
            raise KilnError(f"no valid cache entry to import at {path}", hint="create it first with put_text / get_or_create")
        spec = importlib.util.spec_from_file_location(name, path, loader=_NoBytecodeLoader(name, str(path)))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses, pickling and inspect look modules up by name
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        return mod

    # -- maintenance ------------------------------------------------------------------------------------
    def _entries(self):
        if not self.root.is_dir():
            return
        for kind_dir in sorted(self.root.iterdir()):
            if kind_dir.is_dir() and _KIND.match(kind_dir.name):
                for f in sorted(kind_dir.iterdir()):
                    if f.is_file() and _KEY.match(f.stem) and f.suffix in _SUFFIX.values():
                        yield kind_dir.name, f

    def stats(self) -> dict:
        """Entries and bytes on disk, in all and per kind, plus this process's hits / misses / rebuilds."""
        kinds: dict[str, dict] = {}
        for kind, f in self._entries():
            k = kinds.setdefault(kind, {"entries": 0, "bytes": 0})
            k["entries"] += 1
            k["bytes"] += f.stat().st_size
        return {"root": str(self.root), "entries": sum(k["entries"] for k in kinds.values()),
                "bytes": sum(k["bytes"] for k in kinds.values()), "kinds": kinds, **self.counts}

    def clear(self) -> int:
        """Delete every entry, leftover temp file and lock; returns the number of entries removed. Only
        files of the cache's own naming are touched, so a mistaken root (say $HOME) loses nothing else."""
        n = 0
        for _, f in list(self._entries()):
            f.unlink(missing_ok=True)
            n += 1
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.is_dir() and (_KIND.match(d.name) or d.name == ".locks"):
                    for f in d.iterdir():
                        if f.name.endswith((".tmp", ".lock")):
                            f.unlink(missing_ok=True)
                    try:
                        d.rmdir()
                    except OSError:
                        pass  # not empty: something else lives there
        return n


def _dumps(value) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise KilnError(f"cache value is not plain JSON: {e}") from e
