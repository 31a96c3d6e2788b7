"""The Target: where and how compiled graphs run. Built ONCE from a CompileConfig and passed down to the
executor, its plans and codegen, so that no setting is dropped on the way (the kernel cache once ignored
``cache_dir`` because a module built its own ``Cache()``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..codegen.cache import Cache
from ..codegen.tuning import Tuner
from ..config import CompileConfig
from ..errors import KilnError


@dataclass
class Target:
    device: torch.device  # canonical: "cuda" is "cuda:<current>"
    backend: str  # "kernels" | "reference" (resolved from "auto")
    cache: Cache  # generated kernels and tuning choices
    tuner: Tuner  # per-shape implementation choices (kernels backend)
    cuda_graphs: bool = True  # replay each shape bucket as a CUDA graph (kernels backend on CUDA)
    max_plans: int = 8  # shape buckets kept planned, least recently used goes

    @classmethod
    def from_config(cls, config: CompileConfig | None = None, *, default_device=None, tuning: dict | None = None,
                    tuner: Tuner | None = None) -> "Target":
        """``config``'s target; its device, else ``default_device`` (where the weights are), else the CPU.
        ``tuning``: an artifact's tuning.json, whose choices (and refinements) the tuner starts from; ``tuner``: use this one."""
        config = config or CompileConfig()
        device = canonical_device(torch.device(config.device or default_device or "cpu"))
        backend = ("kernels" if device.type == "cuda" else "reference") if config.backend == "auto" else config.backend
        check_backend(device, backend)
        cache = Cache.from_config(config)
        if tuner is None:
            tuning = tuning or {}
            tuner = Tuner(cache, decisions=tuning.get("decisions"), refined=tuning.get("refined"), force=config.kernels)
        return cls(device, backend, cache, tuner, config.cuda_graphs, config.max_plans)


def check_backend(device: torch.device, backend: str) -> None:
    """The kernels backend launches Triton kernels: CUDA, or Triton's interpreter on the CPU (for testing)."""
    if backend == "kernels" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KilnError(f"the kernels backend needs CUDA, and this runs on {device}",
                        hint="use the reference backend on the CPU (backend='reference', or --backend reference); "
                             "TRITON_INTERPRET=1, set before kiln is imported, runs the kernels under Triton's "
                             "interpreter, for testing")


def canonical_device(d: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so it compares equal to the device of tensors created on it."""
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d
