"""Code generation: scheduling the optimized IR into kernels, Triton templates and generated kernels."""
