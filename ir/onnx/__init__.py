"""ONNX in and out: ``from_onnx`` imports a model (opset >= 17; older ones are upgraded) into kiln's IR, ``to_onnx`` / ``save_onnx``
export a kiln graph (opset 18; fused ops in the custom ``kiln`` domain)."""
from .export import KILN_DOMAIN, save_onnx, to_onnx
from .importer import from_onnx

__all__ = ["from_onnx", "to_onnx", "save_onnx", "KILN_DOMAIN"]
