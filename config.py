"""CompileConfig: the one typed set of knobs a compile takes. Stored in every artifact."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import KilnError
from .ir.kv_quant import KV_DTYPES
from .passes.pipeline import PASS_NAMES
from .passes.quantize_acts import MODES as ACT_MODES
from .passes.quantize_acts import ActQuantSpec
from .passes.quantize_weights import MODES, QuantizeSpec


BACKENDS = ("auto", "kernels", "reference")
KERNEL_CHOICES = {"gemm": ("cublas", "cublaslt", "blaslt", "triton", "triton-rstd", "triton-tma", "triton-skinny", "triton-qgemm",
                          "dequant-cublas", "triton-aqgemm", "scaled-mm", "int-mm", "reference"),
                  "attention": ("sdpa", "kiln", "kiln-tma", "kiln-decode", "kiln-decode-last", "kiln-decode-whole", "kiln-rope-decode",
                                "kiln-rope-decode-last", "kiln-rope-decode-whole"),
                  "rope_kv": ("separate", "triton-rope-kv"),
                  "quantize": ("fused", "separate")}  # an AQGEMM input's quantizer in the kernel producing it, or apart


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
    #: weight-only quantization of every matmul on a stored weight: None (off), "w8a16" (int8 per output channel),
    #: "w4a16" (int4 in groups of quantize_group), rounded to nearest; "w4a16-gptq" / "w8a16-gptq": GPTQ on
    #: calibration data (``kiln.compile(..., calibration=...)``); compute-bound (weights and activations in 8 bits,
    #: activations per token at run time): "fp8" (e4m3, no calibration needed), "w8a8" (int8 with SmoothQuant, its
    #: strength searched per GEMM input on calibration data)
    quantize: str | None = None
    #: input features per scale of 4-bit weights: 32, 64, 128, or None (one scale per output channel)
    quantize_group: int | None = 128
    #: symmetric grids (no zero points); False: a uint8 zero point per group
    quantize_symmetric: bool = True
    #: quantize the output (LM) head too; None: at 8 bits in w8a16 / w4a16 / fp8, and in w8a8 where it is an LM head
    quantize_lm_head: bool | None = None
    #: GPTQ visits input features by descending Hessian diagonal (act_order)
    quantize_act_order: bool = False
    #: w8a8's SmoothQuant strength: "search" (per GEMM input, on the calibration data), "off", or a fixed value in [0, 1]
    quantize_smoothing: str | float = "search"
    #: fp8 / w8a8: an AQGEMM whose input is another GEMM's output (the down projection, DiT's fc2) quantizes it with a
    #: scale per token and this many features (128), which that GEMM's epilogue stores itself; 0: one scale per token
    #: (the default: the blocks' K-step scaling made the 1B prefill slower on an H100, README "Compute-bound ...")
    quantize_act_blocks: int = 0
    #: tensor parallel: the number of ranks the graph is sharded over (passes/shard_tensor_parallel.py); 1: not sharded
    tp: int = 1
    #: the rank whose shard this is; None: the process group's rank (torch.distributed, initialised with tp ranks)
    tp_rank: int | None = None
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
        self.quantize_spec()  # checks the quantize knobs
        if not isinstance(self.tp, int) or self.tp < 1 or (self.tp_rank is not None and not 0 <= self.tp_rank < self.tp):
            raise KilnError(f"CompileConfig.tp = {self.tp!r}, tp_rank = {self.tp_rank!r}: tp is a rank count >= 1, tp_rank one "
                            "of its ranks (or None: the process group's)")
        if self.tp > 1 and "shard_tensor_parallel" in self.disable:
            raise KilnError("CompileConfig.tp > 1 needs the pass shard_tensor_parallel", hint="do not disable it, or use tp=1")
        unknown = [d for d in self.disable if d not in PASS_NAMES]
        if unknown:
            raise KilnError(f"unknown pass name(s) to disable: {', '.join(unknown)}",
                            hint=f"passes are: {', '.join(PASS_NAMES)}")

    def quantize_spec(self) -> QuantizeSpec | ActQuantSpec | None:
        """What the quantize_weights pass (or smooth and quantize_acts) do (None: quantization off)."""
        if self.quantize is None:
            return None
        if self.quantize not in MODES and self.quantize not in ACT_MODES:
            raise KilnError(f"CompileConfig.quantize must be None or one of {', '.join([*MODES, *ACT_MODES])}, got {self.quantize!r}")
        if self.quantize_lm_head not in (None, True, False):
            raise KilnError(f"CompileConfig.quantize_lm_head must be None, True or False, got {self.quantize_lm_head!r}")
        if self.quantize in ACT_MODES:
            return ActQuantSpec(self.quantize, self.quantize_smoothing, self.quantize_lm_head, self.quantize_act_blocks)
        return QuantizeSpec(self.quantize, self.quantize_group, bool(self.quantize_symmetric), self.quantize_lm_head,
                            bool(self.quantize_act_order))

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
