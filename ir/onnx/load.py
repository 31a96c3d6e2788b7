"""Reading an ONNX file: the model, its external-data files and the checks that make every way a file can be
broken one clear :class:`KilnError` naming the file."""
from __future__ import annotations

import os

import onnx
import onnx.version_converter

from ...errors import KilnError

MIN_OPSET = 17  # older models are upgraded to this opset with onnx's version converter


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


def upgrade_opset(model: onnx.ModelProto, path: str) -> tuple[onnx.ModelProto, str | None]:
    """``model`` at opset >= MIN_OPSET, and a note when it had to be upgraded: a model of an older opset (a 2021
    BERT export is opset 11-13) goes through onnx's version converter, whose failure is one clear KilnError."""
    opset = default_opset(model)
    if opset is None or opset >= MIN_OPSET:  # (no default opset: only other domains' ops, listed as unsupported)
        return model, None
    try:
        model = onnx.version_converter.convert_version(model, MIN_OPSET)
        # the converter keeps the IR version, but its adapters write initializers that are not graph inputs,
        # which IR < 4 forbids: the IR version of the new opset
        model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", MIN_OPSET)], ignore_unknown=True))
        onnx.checker.check_model(model)
    except Exception as e:
        raise KilnError(f"{path}: opset {opset} is older than the {MIN_OPSET} kiln reads, and onnx.version_converter cannot "
                        f"upgrade it: {_first_line(e)}",
                        hint=f"export the model again with torch.onnx.export(..., opset_version={MIN_OPSET}) or newer") from None
    return model, f"converted from opset {opset} to {MIN_OPSET} with onnx.version_converter"


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
