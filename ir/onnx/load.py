"""Reading an ONNX file: the model, its external-data files and the checks that make every way a file can be
broken one clear :class:`KilnError` naming the file."""
from __future__ import annotations

import os

import onnx

from ...errors import KilnError

MIN_OPSET = 17


def load_model(path: str) -> onnx.ModelProto:
    """Read ``path`` (and its external-data files) into a checked ModelProto; every way a file can be
    broken is one clear :class:`KilnError` naming the file."""
    if not os.path.exists(path):
        raise KilnError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise KilnError(f"{path}: not a readable ONNX file: truncated or corrupt (the protobuf does not parse: "
                        f"{type(e).__name__})", hint="export it again; check the download or copy is complete") from None
    check_header(model, path)
    base = os.path.dirname(os.path.abspath(path))
    for t in _external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        file = os.path.join(base, loc)
        if not loc or not os.path.isfile(file):
            raise KilnError(f"{path}: external data file {loc!r} of initializer {t.name!r} is missing (looked in {base})",
                            hint="keep the data file(s) next to the .onnx file, under the name the model records")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > os.path.getsize(file):
            raise KilnError(f"{path}: external data file {loc!r} is truncated: initializer {t.name!r} needs bytes up "
                            f"to {end}, the file has {os.path.getsize(file)}")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, base)
    except Exception as e:
        raise KilnError(f"{path}: cannot read its external data: {_first_line(e)}") from None
    check_model(model if model.ByteSize() < 2**31 - 2**20 else os.path.abspath(path), path)
    return model


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def check_header(model: onnx.ModelProto, path: str) -> None:
    if not model.HasField("graph") or not model.ir_version:
        raise KilnError(f"{path}: not an ONNX model (no graph or IR version; truncated or corrupt?)")
    opset = default_opset(model)
    if opset is None:
        raise KilnError(f"{path}: the model imports no default ('ai.onnx') opset")
    if opset < MIN_OPSET:
        raise KilnError(f"{path}: opset {opset} is too old; kiln reads ONNX opset {MIN_OPSET} and newer",
                        hint=f"export with torch.onnx.export(..., opset_version={MIN_OPSET}) or newer, or upgrade the "
                             f"file with onnx.version_converter.convert_version(model, {MIN_OPSET})")


def check_model(model, path: str) -> None:
    """onnx's checker (on the path when the model is past protobuf's 2 GiB)."""
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise KilnError(f"{path}: invalid ONNX model: {_first_line(e)}") from None


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
