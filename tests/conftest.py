"""Shared test settings: the Triton interpreter on CPU, GPU skipping, no refinement of plans (KILN_REFINE=0).

Without CUDA, Triton kernels run under TRITON_INTERPRET=1 (set before any kernel is defined). On a GPU
machine the interpreter stays off unless asked for, and the two kinds of kernel test split by marker:
``interpreter`` tests need TRITON_INTERPRET=1, ``gpu`` tests need CUDA with the interpreter off
(``make test-gpu``)."""
import importlib.util
import os
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# a GPU plan's decode GEMMs are timed again in the step by default (runtime/refine.py: ~10 s a decode plan); the tests of
# everything else do not need it, tests/runtime/test_refine.py sets it where it is tested
os.environ.setdefault("KILN_REFINE", "0")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU with TRITON_INTERPRET unset (make test-gpu)")
    no_interp = pytest.mark.skip(reason="a Triton interpreter test: run with TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords:
            if not torch.cuda.is_available() or INTERPRET:
                item.add_marker(no_gpu)
        elif "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(no_interp)


@pytest.fixture(scope="module")
def pipeline_models():
    """The tiny HF Llama / diffusers DiT configs of the pipeline tests (loaded by path: tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("_pipeline_models", Path(__file__).parent / "passes" / "test_pipeline.py")
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    return dict(llama=(t.hf_llm, t.ids, t.LLM_DIMS), dit=(t.dit, t.dit_inputs, t.DIT_DIMS))


@pytest.fixture(autouse=True, scope="session")
def _kiln_cache_dir(tmp_path_factory):
    """Kernels and tuning choices of the test session go to a temporary cache, not the user's."""
    if "KILN_CACHE_DIR" not in os.environ:
        os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "kiln-cache")
