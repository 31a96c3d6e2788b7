"""kiln's version and the versions of what it runs on: recorded in every artifact and in every cache key."""
from __future__ import annotations

import platform

import torch

__version__ = "0.1.0"


def versions() -> dict:
    """kiln, torch, triton (None where it is not installed) and python versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"kiln_version": __version__, "torch_version": torch.__version__, "triton_version": triton_version,
            "python_version": platform.python_version()}
