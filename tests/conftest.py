"""Shared test settings: the Triton interpreter on CPU, the tolerance table, GPU skipping."""
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton kernel is defined; `make test-gpu` sets 0

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
