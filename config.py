"""CompileConfig: the one typed set of knobs a compile takes. Stored in every artifact."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import KilnError
from .ir.kv_quant import KV_DTYPES
from .passes.pipeline import PASS_NAMES


BACKENDS = ("auto", "kernels", "reference")
KERNEL_CHOICES = {"gemm": ("cublas", "cublaslt", "triton"), "attention": ("sdpa", "kiln", "kiln-decode")}


@dataclass
class CompileConfig:
    #: pass names to switch off (see ``kiln.passes.pipeline.PASS_NAMES``)
    disable: tuple[str, ...] = ()
    #: where the compiled model runs: "cpu", "cuda", "cuda:1"; default: where the model's weights are
    device: str | None = None
    #: how many shape bindings keep a ready plan (and, on the GPU, a CUDA graph); least recently used goes
    max_plans: int = 8
    #: after compiling, run the example inputs through eager and kiln and report the relative error
    verify: bool = False
    #: kernel / autotune cache directory; None: $KILN_CACHE_DIR if set, else the platform's user cache dir
    cache_dir: str | None = None
    #: how the graph runs: "kernels" (scheduled Triton / cuBLAS / SDPA launches over planned buffers),
    #: "reference" (each op's torch implementation), "auto" (kernels on CUDA, reference on the CPU)
    backend: str = "auto"
    #: replay each shape bucket's launch list as a CUDA graph (kernels backend on CUDA)
    cuda_graphs: bool = True
    #: skip measuring: kind ("gemm", "attention") -> implementation ("cublas" / "cublaslt" / "triton", "sdpa" / "kiln" / "kiln-decode")
    kernels: dict = field(default_factory=dict)
    #: notes kept with the artifact (free-form, e.g. the registry name it was built from)
    tags: dict = field(default_factory=dict)
    #: an LLM generator's KV cache: None (the activations' dtype), "int8" or "fp8" (e4m3): quantized codes plus a
    #: float32 scale per (row, kv head, slot), dequantized inside the attention kernels (``ir/kv_quant.py``)
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        self.disable = tuple(self.disable)
        if self.max_plans < 1:
            raise KilnError(f"CompileConfig.max_plans must be >= 1, got {self.max_plans}")
        if self.backend not in BACKENDS:
            raise KilnError(f"CompileConfig.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for kind, impl in self.kernels.items():
            if impl not in KERNEL_CHOICES.get(kind, ()):
                raise KilnError(f"CompileConfig.kernels: {kind!r} -> {impl!r} is not a choice",
                                hint="; ".join(f"{k}: {', '.join(v)}" for k, v in KERNEL_CHOICES.items()))
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_DTYPES:
            raise KilnError(f"CompileConfig.kv_cache_dtype must be None, {' or '.join(repr(k) for k in KV_DTYPES)}, "
                            f"got {self.kv_cache_dtype!r}")
        unknown = [d for d in self.disable if d not in PASS_NAMES]
        if unknown:
            raise KilnError(f"unknown pass name(s) to disable: {', '.join(unknown)}",
                            hint=f"passes are: {', '.join(PASS_NAMES)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["disable"] = list(self.disable)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompileConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise KilnError(f"unknown CompileConfig field(s): {', '.join(sorted(unknown))}",
                            hint=f"fields are: {', '.join(sorted(names))}")
        return cls(**d)
