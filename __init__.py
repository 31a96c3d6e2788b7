"""kiln: a compiler-style graph optimizer and runtime for transformer inference.

    model = kiln.jit(model)                      # compile on first call
    m = kiln.compile(model, (x,), dynamic=...)   # compile now
    m.save("model.kiln"); m = kiln.load("model.kiln")
    g = kiln.from_hf(hf_llama); g.generate("Hello", max_new_tokens=64)   # LLM generation, KV cache
"""
__version__ = "0.1.0"

from .api import CompiledModel, Dim, compile, jit, load  # noqa: E402
from .config import CompileConfig  # noqa: E402
from .errors import ArtifactError, CaptureError, InputError, KilnError, UnsupportedOpsError  # noqa: E402
from .runtime.llm import Generator, from_hf  # noqa: E402
from .runtime.sampling import SamplingParams  # noqa: E402

__all__ = ["jit", "compile", "load", "from_hf", "Generator", "SamplingParams", "CompileConfig", "CompiledModel", "Dim",
           "KilnError", "InputError",
           "CaptureError", "ArtifactError", "UnsupportedOpsError", "__version__"]
