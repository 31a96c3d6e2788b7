"""Hand-written Triton templates: GEMM with fused epilogues, attention, norms."""
