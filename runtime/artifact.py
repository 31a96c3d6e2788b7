"""The ``.kiln`` artifact: a zip holding data only.

    manifest.json       format version; kiln / torch / triton / python versions; inputs and outputs
                        with dtypes and symbolic dims; symbol ranges; the call signature; the config;
                        sha256 and size of every other member
    graph.json          the optimized IR (kiln.ir.serialize)
    weights.safetensors every weight the graph reads
    report.json         the compile report

Loading never unpickles and never runs code from the file. It checks, in order: the file is a zip,
the manifest parses and names a format this kiln reads, every member listed is present and matches
its checksum, the graph parses and verifies against the weights. A failure names the check and the
member.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import tempfile
import zipfile

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file as st_save_file

from ..errors import ArtifactError, KilnError
from ..ir.graph import Graph, GraphError
from ..ir.serialize import graph_from_json, graph_to_json
from ..ir.types import dim_to_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def _versions() -> dict:
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"kiln_version": __version__, "torch_version": torch.__version__, "triton_version": triton_version,
            "python_version": platform.python_version()}


def _io_specs(nodes, names) -> list[dict]:
    return [{"name": name, "shape": [dim_to_json(d) for d in n.shape], "dtype": n.dtype} for n, name in zip(nodes, names)]


def save(path: str | os.PathLike, graph: Graph, *, signature: dict, config: dict, report: dict | None = None,
         extra: dict | None = None, tuning: dict | None = None, overwrite: bool = False) -> str:
    """Write ``graph`` (with its weights) to ``path``. Refuses to replace an existing file unless
    ``overwrite``; the file appears atomically (a crash leaves no half-written artifact)."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise KilnError(f"{path} already exists", hint="pass overwrite=True (kiln compile --force) to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    graph_bytes = json.dumps(graph_to_json(graph), separators=(",", ":")).encode()
    report_bytes = json.dumps(report or {}, indent=1).encode()
    tensors = {}
    for name, t in graph.weights.items():
        t = t.detach()
        tensors[name] = t.to("cpu").contiguous() if t.device.type != "cpu" or not t.is_contiguous() else t
    manifest = {
        "format": "kiln",
        "format_version": FORMAT_VERSION,
        **_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu_arch": _gpu_arch(graph),
        "inputs": _io_specs(graph.inputs, [n.attrs["name"] for n in graph.inputs]),
        "outputs": _io_specs(graph.outputs, graph.output_names),
        "symbols": {k: list(v) for k, v in graph.symbols.items()},
        "signature": signature,
        "config": config,
        **(extra or {}),
        "members": {},
    }
    fd, tmp = tempfile.mkstemp(prefix=".kiln-", suffix=".tmp", dir=directory)
    os.close(fd)
    wtmp = tmp + ".weights"
    try:
        st_save_file(tensors, wtmp, metadata={"format": "pt"})
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            members = [("graph.json", graph_bytes), ("report.json", report_bytes)]
            if tuning:
                members.append(("tuning.json", json.dumps(tuning, indent=1).encode()))
            for member, data in members:
                zf.writestr(member, data)
                manifest["members"][member] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            zf.write(wtmp, "weights.safetensors")
            manifest["members"]["weights.safetensors"] = {"sha256": _sha256_file(wtmp), "size": os.path.getsize(wtmp)}
            zf.writestr(MANIFEST, json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    finally:
        for f in (tmp, wtmp):
            if os.path.exists(f):
                os.unlink(f)
    return path


def _gpu_arch(graph: Graph):
    for t in graph.weights.values():
        if t.is_cuda:
            major, minor = torch.cuda.get_device_capability(t.device)
            return f"sm_{major}{minor}"
        break
    return None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> tuple[zipfile.ZipFile, dict]:
    """Open the zip and return it with its parsed, version-checked manifest."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path}: not a kiln artifact (check 'zip container' failed: not a zip file)") from None
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
            f"({_versions()['kiln_version']}) reads versions 1 to {FORMAT_VERSION}",
            hint="upgrade kiln to load it, or recompile the model with this kiln")
    return zf, manifest


def _read_member(zf: zipfile.ZipFile, path: str, name: str, meta: dict) -> bytes:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ArtifactError(f"{path}: check 'members present' failed: member {name!r} is missing") from None
    if info.file_size != meta.get("size", info.file_size):
        raise ArtifactError(f"{path}: check 'checksum' failed for member {name!r}: size {info.file_size}, "
                            f"manifest says {meta.get('size')}")
    h = hashlib.sha256()
    parts = []
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                parts.append(chunk)
    except (zipfile.BadZipFile, OSError) as e:  # zip's own CRC caught the damage first
        raise ArtifactError(f"{path}: check 'checksum' failed for member {name!r}: the data is corrupt ({e})") from None
    if h.hexdigest() != meta.get("sha256"):
        raise ArtifactError(f"{path}: check 'checksum' failed for member {name!r}: sha256 {h.hexdigest()[:16]}... "
                            f"does not match the manifest ({str(meta.get('sha256'))[:16]}...); the file is "
                            "corrupt or was modified")
    return b"".join(parts)


def load(path: str | os.PathLike) -> tuple[Graph, dict, dict, dict]:
    """Read and check an artifact: returns (graph with weights, manifest, report dict, tuning dict)."""
    path = os.fspath(path)
    zf, manifest = read_manifest(path)
    with zf:
        members = manifest.get("members") or {}
        for required in ("graph.json", "weights.safetensors"):
            if required not in members:
                raise ArtifactError(f"{path}: check 'manifest' failed: member {required!r} is not listed")
        data = {name: _read_member(zf, path, name, meta) for name, meta in members.items()}
    try:
        weights = st_load(data.pop("weights.safetensors"))
    except Exception as e:
        raise ArtifactError(f"{path}: check 'weights' failed for member 'weights.safetensors': {e}") from None
    try:
        graph = graph_from_json(json.loads(data.pop("graph.json")), weights)
    except (GraphError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path}: check 'graph' failed for member 'graph.json': {e}") from None
    report = json.loads(data["report.json"]) if "report.json" in data else {}
    try:
        tuning = json.loads(data["tuning.json"]) if "tuning.json" in data else {}
        if tuning and not isinstance(tuning.get("decisions"), dict):
            raise ValueError("no 'decisions' object")
    except ValueError as e:
        raise ArtifactError(f"{path}: check 'tuning' failed for member 'tuning.json': {e}") from None
    return graph, manifest, report, tuning
