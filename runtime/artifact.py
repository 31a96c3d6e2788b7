"""The ``.kiln`` artifact: a zip holding data only.

    manifest.json       format version; kiln / torch / triton / python versions; inputs and outputs
                        with dtypes and symbolic dims; symbol ranges; the call signature; the config;
                        sha256 and size of every other member (the weights' also as a tree hash:
                        ``sha256_tree``, checked from threads at load)
    graph.json          the optimized IR (kiln.ir.serialize)
    weights.safetensors every weight the graph reads
    report.json         the compile report

A file of several graphs (a diffusion pipeline: denoising step, VAE decoder, text encoder) holds each as a named
*component*: its graph.json, weights.safetensors, report.json (and tuning.json) under ``components/<name>/``,
its inputs, outputs, symbols, signature and config in the manifest's ``components`` record, every member listed
with its checksum like any other. Such a file has format version 2; a single graph is still written as version 1
(its layout is unchanged), so a kiln that reads only version 1 reads it. ``load(path, component=NAME)`` loads one
component with every check a single-graph load makes.

Loading never unpickles and never runs code from the file. It checks, in order: the file is a zip,
the manifest parses and names a format this kiln reads, every member listed is present and matches
its checksum, the graph parses and verifies against the weights. A failure names the check and the
member. The weights are not read: their tensors view the file, mapped copy-on-write.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import re
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors.torch import save_file as st_save_file

from ..errors import ArtifactError, KilnError
from ..ir.graph import Graph, GraphError
from ..ir.serialize import graph_from_json, graph_to_json
from ..ir.types import dim_to_json
from ..version import versions
from . import warm_libs

FORMAT_VERSION = 2  # the newest this kiln reads; 2 added named components
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FILES = "files/"  # prefix of the members save(files=...) adds
COMPONENTS = "components/"  # prefix of the members of named components
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CHUNK = 1 << 22
_HASH_SLICE = 64 << 20  # bytes per sha256 update; hashlib releases the GIL during each
_TREE_CHUNK = 64 << 20  # bytes per piece of the weights' tree hash, whose pieces are hashed in parallel at load
_ALIGN = 64  # the weights' data starts on this boundary in the file, so every tensor can view it in place


def _io_specs(nodes, names) -> list[dict]:
    return [{"name": name, "shape": [dim_to_json(d) for d in n.shape], "dtype": n.dtype} for n, name in zip(nodes, names)]


@dataclass
class Component:
    """One graph of an artifact with what loading it needs: the call signature, the config, the compile report,
    the tuner's decisions, more entries for its manifest record (the device it was compiled for)."""
    graph: Graph
    signature: dict
    config: dict
    report: dict | None = None
    tuning: dict | None = None
    extra: dict | None = None


def save(path: str | os.PathLike, graph: Graph, *, signature: dict, config: dict, report: dict | None = None,
         extra: dict | None = None, tuning: dict | None = None, files: dict[str, bytes] | None = None,
         overwrite: bool = False) -> str:
    """Write ``graph`` (with its weights) to ``path``. Refuses to replace an existing file unless
    ``overwrite``; the file appears atomically (a crash leaves no half-written artifact)."""
    return _write(path, {"": Component(graph, signature, config, report, tuning)}, extra, files, overwrite)


def save_components(path: str | os.PathLike, components: dict[str, Component], *, extra: dict | None = None,
                    files: dict[str, bytes] | None = None, overwrite: bool = False) -> str:
    """Write several graphs as named components of one artifact (format version 2), like :func:`save`."""
    if not components:
        raise KilnError("an artifact of components needs at least one component")
    for name in components:
        if not isinstance(name, str) or not _COMPONENT_NAME.fullmatch(name):
            raise KilnError(f"component name {name!r} is not a plain name (letters, digits, '_', '.', '-')")
    return _write(path, dict(components), extra, files, overwrite)


def _record(c: Component) -> dict:
    """A graph's manifest entries: inputs and outputs with dtypes and symbolic dims, symbol ranges, signature, config."""
    graph = c.graph
    return {"gpu_arch": _gpu_arch(graph), "inputs": _io_specs(graph.inputs, [n.attrs["name"] for n in graph.inputs]),
            "outputs": _io_specs(graph.outputs, graph.output_names), "symbols": {k: list(v) for k, v in graph.symbols.items()},
            "signature": c.signature, "config": c.config, "libraries": warm_libs.libraries(n.op for n in graph.nodes),
            **(c.extra or {})}


def _members(c: Component) -> list[tuple[str, bytes]]:
    members = [("graph.json", json.dumps(graph_to_json(c.graph), separators=(",", ":")).encode()),
               ("report.json", json.dumps(c.report or {}, indent=1).encode())]
    if c.tuning:
        members.append(("tuning.json", json.dumps(c.tuning, indent=1).encode()))
    return members


def _cpu_weights(graph: Graph) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, t in graph.weights.items():
        t = t.detach()
        tensors[name] = t.to("cpu").contiguous() if t.device.type != "cpu" or not t.is_contiguous() else t
    return tensors


def _write(path, components: dict[str, Component], extra: dict | None, files: dict[str, bytes] | None, overwrite: bool) -> str:
    """Components named "" (a single graph) live at the root in the version-1 layout; others under components/<name>/."""
    path = check_output_path(path, overwrite, replace_hint="pass overwrite=True (kiln compile --force) to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    single = list(components) == [""]
    manifest = {"format": "kiln", "format_version": 1 if single else FORMAT_VERSION, **versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **(_record(components[""]) if single else {}), **(extra or {})}
    if not single:
        manifest["components"] = {name: _record(c) for name, c in components.items()}
    manifest["members"] = {}
    fd, tmp = tempfile.mkstemp(prefix=".kiln-", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; an artifact is an ordinary file, readable as the umask allows
    wtmp = tmp + ".weights"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, c in components.items():
                prefix = f"{COMPONENTS}{name}/" if name else ""
                members = [(prefix + member, data) for member, data in _members(c)]
                if name == list(components)[0]:
                    members += [(FILES + f, bytes(data)) for f, data in (files or {}).items()]  # data kept with the model
                for member, data in members:
                    zf.writestr(member, data)
                    manifest["members"][member] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                st_save_file(_cpu_weights(c.graph), wtmp, metadata={"format": "pt"})
                with ThreadPoolExecutor(1) as pool:  # the checksums hashed while the file is copied into the zip
                    digests = pool.submit(_file_digests, wtmp)
                    _write_aligned(zf, wtmp, prefix + WEIGHTS)
                    manifest["members"][prefix + WEIGHTS] = {**digests.result(), "size": os.path.getsize(wtmp)}
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
        _publish(tmp, path, overwrite)
    finally:
        for f in (tmp, wtmp):
            if os.path.exists(f):
                os.unlink(f)
    return path


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Give the finished file its name. Without ``overwrite`` the name is claimed atomically (a hard link fails
    if the name exists), so of two processes writing one path at once, exactly one succeeds."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KilnError(f"{path} already exists (another process wrote it while this one was writing)",
                        hint="pass overwrite=True (kiln compile --force) to replace it") from None
    except OSError:  # a file system without hard links: claim the name exclusively, then fill it
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise KilnError(f"{path} already exists", hint="pass overwrite=True (kiln compile --force) to replace it") from None
        os.replace(tmp, path)


def check_output_path(path: str | os.PathLike, overwrite: bool = False, replace_hint: str = "pass overwrite=True to replace it") -> str:
    """``path`` as a str when a file can be written there; else a KilnError: it is a directory, its directory
    does not exist (kiln creates none), or it exists and ``overwrite`` is False (``replace_hint`` says what to do)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise KilnError(f"{path} is a directory", hint=f"name the file to write, e.g. {os.path.join(path, 'NAME')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise KilnError(f"{path}: the directory {parent} does not exist", hint="create it first: kiln does not create directories")
    if os.path.exists(path) and not overwrite:
        raise KilnError(f"{path} already exists", hint=replace_hint)
    return path


def _umask() -> int:
    """The process's umask: os has no getter, so it is set and put back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_aligned(zf: zipfile.ZipFile, src: str, name: str) -> None:
    """Store ``src`` as member ``name`` with its data starting on an ``_ALIGN`` boundary of the file,
    padded by an extra field in the local header (as Android's zipalign does)."""
    info = zipfile.ZipInfo.from_file(src, name)
    info.compress_type = zipfile.ZIP_STORED
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule: it adds a 20-byte extra
    header = 30 + len(info.filename.encode()) + (20 if zip64 else 0)
    pad = -(zf.fp.tell() + header) % _ALIGN
    if pad:
        pad += _ALIGN if pad < 4 else 0  # an extra field is at least its 4-byte id and length
        info.extra = struct.pack("<HH", 0xD935, pad - 4) + bytes(pad - 4)
    with open(src, "rb") as f, zf.open(info, "w", force_zip64=zip64) as out:
        shutil.copyfileobj(f, out, _CHUNK)


def _gpu_arch(graph: Graph):
    for t in graph.weights.values():
        if t.is_cuda:
            major, minor = torch.cuda.get_device_capability(t.device)
            return f"sm_{major}{minor}"
        break
    return None


def _sha256(data) -> str:
    h = hashlib.sha256()
    for start in range(0, len(data), _HASH_SLICE):
        h.update(data[start:start + _HASH_SLICE])
    return h.hexdigest()


def _tree_sha256(data, chunk: int) -> str:
    """The sha256 of the concatenated sha256 digests of ``data``'s ``chunk``-byte pieces, the pieces hashed from up to
    8 threads (hashlib releases the GIL while it hashes a large buffer): a 1.4 GB DiT's weights hash in a fraction
    of the second that one sha256 over them takes, which a warm start used to wait for."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1, len(pieces)))) as pool:
        digests = list(pool.map(lambda piece: hashlib.sha256(piece).digest(), pieces))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _file_digests(path: str) -> dict:
    """The manifest's checksums of a weights file: its sha256 (what any tool checks) and its tree hash (what load
    checks, in parallel), computed at once."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"")) as m:
            data = memoryview(m)
            try:
                with ThreadPoolExecutor(1) as whole:
                    digest = whole.submit(_sha256, data)
                    tree = _tree_sha256(data, _TREE_CHUNK)
                    digest = digest.result()
            finally:
                data.release()
    return {"sha256": digest, "sha256_tree": {"chunk_bytes": _TREE_CHUNK, "sha256": tree}}


def read_manifest(path: str | os.PathLike) -> tuple[zipfile.ZipFile, dict]:
    """Open the zip and return it with its parsed, version-checked manifest."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".kiln"))[:1]
        raise ArtifactError(f"{path} is a directory, not a .kiln artifact",
                            hint="give the artifact file" + (f", e.g. {os.path.join(path, found[0])}" if found else ""))
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path}: not a kiln artifact (check 'zip container' failed: not a zip file)") from None
    except OSError as e:  # unreadable: permissions, a special file
        raise ArtifactError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except KeyError:
        zf.close()
        raise ArtifactError(f"{path}: check 'manifest' failed: member {MANIFEST!r} is missing") from None
    except (ValueError, zipfile.BadZipFile) as e:
        zf.close()
        raise ArtifactError(f"{path}: check 'manifest' failed: member {MANIFEST!r} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "kiln":
        zf.close()
        raise ArtifactError(f"{path}: check 'manifest' failed: {MANIFEST!r} does not describe a kiln artifact")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        zf.close()
        raise ArtifactError(
            f"{path}: check 'format version' failed: the artifact has format version {version}, this kiln "
            f"({versions()['kiln_version']}) reads versions 1 to {FORMAT_VERSION}",
            hint="upgrade kiln to load it, or recompile the model with this kiln")
    return zf, manifest


def _member_info(zf: zipfile.ZipFile, path: str, name: str, meta: dict) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ArtifactError(f"{path}: check 'members present' failed: member {name!r} is missing") from None
    if info.file_size != meta.get("size", info.file_size):
        raise ArtifactError(f"{path}: check 'checksum' failed for member {name!r}: size {info.file_size}, "
                            f"manifest says {meta.get('size')}")
    return info


def _check_sha256(path: str, name: str, digest: str, meta: dict) -> None:
    if digest != meta.get("sha256"):
        raise ArtifactError(f"{path}: check 'checksum' failed for member {name!r}: sha256 {digest[:16]}... "
                            f"does not match the manifest ({str(meta.get('sha256'))[:16]}...); the file is "
                            "corrupt or was modified")


def _read_member(zf: zipfile.ZipFile, path: str, name: str, meta: dict) -> bytes:
    info = _member_info(zf, path, name, meta)
    h = hashlib.sha256()
    parts = []
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                parts.append(chunk)
    except (zipfile.BadZipFile, OSError) as e:  # zip's own CRC caught the damage first
        raise ArtifactError(f"{path}: check 'checksum' failed for member {name!r}: the data is corrupt ({e})") from None
    _check_sha256(path, name, h.hexdigest(), meta)
    return b"".join(parts)


class _Sha256(threading.Thread):
    """The checksum of a member's buffer, computed while ``load`` does everything else (hashlib releases the GIL
    while it hashes a large slice): its tree hash where the manifest ``meta`` records one (``sha256_tree``, hashed
    from several threads), else its sha256. :meth:`check` compares it with the manifest's."""

    def __init__(self, data: memoryview, meta: dict):
        super().__init__(name="kiln-artifact-sha256", daemon=True)
        self._data = data
        tree = meta.get("sha256_tree")
        ok = isinstance(tree, dict) and type(tree.get("chunk_bytes")) is int and tree["chunk_bytes"] > 0
        self._chunk, self._expected = (tree["chunk_bytes"], tree.get("sha256")) if ok else (None, meta.get("sha256"))
        self.hexdigest = ""

    def run(self):
        self.hexdigest = _sha256(self._data) if self._chunk is None else _tree_sha256(self._data, self._chunk)
        self._data = None  # the tensors, not this thread, keep the mapping alive

    def check(self, path: str, name: str) -> None:
        self.join()
        _check_sha256(path, name, self.hexdigest, {"sha256": self._expected})


def _map_member(zf: zipfile.ZipFile, path: str, info: zipfile.ZipInfo) -> memoryview | None:
    """The stored bytes of a member, mapped copy-on-write from the artifact file: no read, no copy.
    None for a compressed or encrypted member (it is read through zipfile instead)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    # ACCESS_COPY: tensors viewing the map are writable, and writes never reach the file
    region = memoryview(mmap.mmap(zf.fp.fileno(), 0, access=mmap.ACCESS_COPY))
    # local file header: signature, 22 bytes of fields, then name and extra-field lengths
    if len(region) < info.header_offset + 30 or region[info.header_offset:info.header_offset + 4] != b"PK\x03\x04":
        raise ArtifactError(f"{path}: check 'checksum' failed for member {info.filename!r}: the data is corrupt "
                            "(bad local file header)")
    name_len, extra_len = struct.unpack_from("<HH", region, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > len(region):
        raise ArtifactError(f"{path}: check 'checksum' failed for member {info.filename!r}: the data is corrupt "
                            "(it runs past the end of the file)")
    return region[start:start + info.file_size]


# safetensors dtype codes for the kiln dtypes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _tensors_from_safetensors(buf) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``buf``, as views of it (no copy).

    Hand-written because the safetensors library deserializes only from a path (it cannot start at
    an offset inside the zip) or from bytes (a full copy of the weights). The layout: an 8-byte
    little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}
    (plus an optional "__metadata__"), then the data, which the tensors must tile exactly.
    Raises ValueError saying what is wrong."""
    if len(buf) < 8:
        raise ValueError(f"{len(buf)} bytes is too short for a safetensors header")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise ValueError(f"the header length {n} runs past the end of the member ({len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except ValueError as e:
        raise ValueError(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    base, size = 8 + n, len(buf) - 8 - n
    tensors, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                raise ValueError("'__metadata__' is not an object")
            continue
        if not isinstance(meta, dict):
            raise ValueError(f"tensor {name!r}: the entry is not an object")
        dtype = _ST_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unknown dtype {meta.get('dtype')!r}; kiln reads {', '.join(_ST_DTYPES)}")
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size):
            raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} do not lie within the {size} bytes of data")
        begin, end = offsets
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes of data for {count} x {dtype} ({count * dtype.itemsize} bytes)")
        spans.append((begin, end, name))
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # frombuffer keeps a reference to buf, so the mapping lives as long as any tensor viewing it
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        tensors[name] = t if t.data_ptr() % dtype.itemsize == 0 else t.clone()  # an unaligned file (old save)
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise ValueError(f"tensor {name!r}: data_offsets start at {begin}, expected {covered} "
                             "(tensors overlap or leave a gap)")
        covered = end
    if covered != size:
        raise ValueError(f"the tensors cover {covered} of the {size} bytes of data")
    return tensors


def load(path: str | os.PathLike, component: str | None = None, on_manifest=None) -> tuple[Graph, dict, dict, dict, dict]:
    """Read and check an artifact: returns (graph with weights, manifest, report dict, tuning dict, files:
    name -> bytes of the members ``save(files=...)`` added). ``component``: the named component of a file of
    several graphs, whose manifest is the file's with the component's record laid over it (and "component").
    ``on_manifest``: called with that manifest once it is read, before the members are (``warm_libs.start``).

    The weights are views of the artifact file, mapped copy-on-write (see ``_map_member``); their
    sha256 runs in a thread alongside everything else and is checked before this returns."""
    path = os.fspath(path)
    zf, manifest = read_manifest(path)
    with zf:
        prefix, manifest = _select(path, manifest, component)
        if on_manifest is not None:
            on_manifest(manifest)
        members = manifest.get("members") or {}
        for required in (prefix + "graph.json", prefix + WEIGHTS):
            if required not in members:
                raise ArtifactError(f"{path}: check 'manifest' failed: member {required!r} is not listed")
        weights_name = prefix + WEIGHTS
        weights_meta = members[weights_name]
        weights_buf = _map_member(zf, path, _member_info(zf, path, weights_name, weights_meta))
        if weights_buf is None:  # compressed: read (and checked) through zipfile, one copy
            weights_buf, hashing = bytearray(_read_member(zf, path, weights_name, weights_meta)), None
        else:
            hashing = _Sha256(weights_buf, weights_meta)
            hashing.start()
        try:
            data = {name[len(prefix):] if name.startswith(prefix) else name: _read_member(zf, path, name, meta)
                    for name, meta in members.items() if name != weights_name and _selected(name, prefix)}
            result = _from_members(path, manifest, data, weights_buf, prefix)
        except ArtifactError:
            if hashing is not None:  # damaged weights explain a bad header or graph mismatch best
                hashing.check(path, weights_name)
            raise
    if hashing is not None:
        hashing.check(path, weights_name)
    return result


def _selected(member: str, prefix: str) -> bool:
    """The members a load reads: its graph's (at the root, or under its component's prefix) and the data files."""
    if member.startswith(FILES):
        return True
    return member.startswith(prefix) if prefix else not member.startswith(COMPONENTS)


def _select(path: str, manifest: dict, component: str | None) -> tuple[str, dict]:
    """The member prefix of the graph to load and the manifest it reads (the component's record over the file's)."""
    components = manifest.get("components")
    if component is None:
        if components is not None:
            names = ", ".join(components) if isinstance(components, dict) else "?"
            raise ArtifactError(f"{path} holds several graphs (components {names}), not one model",
                                hint="load one with kiln.load(path, component=NAME); a diffusion pipeline with "
                                     "kiln.diffusion.load(path) or `kiln sample`")
        return "", manifest
    if not isinstance(components, dict) or not isinstance(components.get(component), dict):
        held = ", ".join(components) if isinstance(components, dict) else "none"
        raise ArtifactError(f"{path}: check 'components' failed: no component {component!r} (it holds: {held})")
    top = {k: v for k, v in manifest.items() if k != "components"}
    return f"{COMPONENTS}{component}/", {**top, **components[component], "component": component}


def _from_members(path: str, manifest: dict, data: dict, weights_buf, prefix: str = "") -> tuple[Graph, dict, dict, dict, dict]:
    """``data``: member name (without the component's prefix) -> bytes; error messages name members in full."""
    try:
        weights = _tensors_from_safetensors(weights_buf)
    except ValueError as e:
        raise ArtifactError(f"{path}: check 'weights' failed for member {prefix + WEIGHTS!r}: {e}") from None
    try:
        graph = graph_from_json(json.loads(data.pop("graph.json")), weights)
    except (GraphError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path}: check 'graph' failed for member {prefix + 'graph.json'!r}: {e}") from None
    report = json.loads(data["report.json"]) if "report.json" in data else {}
    try:
        tuning = json.loads(data["tuning.json"]) if "tuning.json" in data else {}
        if tuning and not isinstance(tuning.get("decisions"), dict):
            raise ValueError("no 'decisions' object")
        refined = tuning.get("refined", {})
        if not isinstance(refined, dict) or not all(isinstance(r, dict) and isinstance(r.get("choice"), str) for r in refined.values()):
            raise ValueError("'refined' is not an object of decisions, each with a 'choice' name")
    except ValueError as e:
        raise ArtifactError(f"{path}: check 'tuning' failed for member {prefix + 'tuning.json'!r}: {e}") from None
    files = {name[len(FILES):]: blob for name, blob in data.items() if name.startswith(FILES)}
    return graph, manifest, report, tuning, files


# ----------------------------------------------------------------------------- tensor-parallel shards


def shard_path(path: str | os.PathLike, rank: int, world: int) -> str:
    """The file of rank ``rank``'s shard of a ``world``-rank artifact ``path``: ``gen.kiln`` -> ``gen.rank0-of-2.kiln``.
    One ordinary artifact per rank: a rank maps its own file only (on a node's local disk, if need be), and
    ``kiln inspect`` reads any of them."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.rank{rank}-of-{world}{ext or '.kiln'}"


def check_shard(path: str, manifest: dict, rank: int, world: int) -> None:
    """Refuse a tensor-parallel shard in a process that is not its rank of a group of its size: the ArtifactError names
    the check that failed."""
    config = manifest.get("config") or {}
    tp, tp_rank = int(config.get("tp", 1)), config.get("tp_rank")
    if tp != world:
        raise ArtifactError(f"{path}: check 'tensor_parallel world size' failed: the artifact is rank {tp_rank}'s shard of a "
                            f"{tp}-rank model, this process is rank {rank} of {world}",
                            hint=f"run it with {tp} ranks (torchrun --nproc-per-node {tp}, or kiln generate --tp {tp})")
    if tp_rank != rank:
        raise ArtifactError(f"{path}: check 'tensor_parallel rank' failed: the artifact is rank {tp_rank}'s shard, this "
                            f"process is rank {rank}", hint=f"load {shard_path('NAME.kiln', rank, world)} on rank {rank}")
