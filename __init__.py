"""kiln: a compiler-style graph optimizer and runtime for transformer inference.

    model = kiln.jit(model)                      # compile on first call
    m = kiln.compile(model, (x,), dynamic=...)   # compile now
    m.save("model.kiln"); m = kiln.load("model.kiln")
    g = kiln.from_hf(hf_llama); g.generate("Hello", max_new_tokens=64)   # LLM generation, KV cache
"""
from .api import CompiledModel, Dim, compile, load
from .config import CompileConfig
from .errors import ArtifactError, CaptureError, InputError, KilnError, SourceChangedError, UnsupportedOpsError
from .jit import jit
from .llm import Generator, SamplingParams, from_hf
from .version import __version__

__all__ = ["jit", "compile", "load", "from_hf", "Generator", "SamplingParams", "CompileConfig", "CompiledModel", "Dim",
           "KilnError", "InputError",
           "CaptureError", "ArtifactError", "UnsupportedOpsError", "SourceChangedError", "__version__"]
