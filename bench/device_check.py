"""Compatibility check on the GPU machine: kiln's reference executor on CUDA, bf16, vs eager.
Writes $OUT/device_check.json. (Speed comes with the codegen issue; this checks correctness only.)"""
import json
import os
import sys

import torch
import transformers

import kiln
from kiln.models.registry import get
from kiln.testing import TOL, rel_err

res = {"torch": torch.__version__, "transformers": transformers.__version__,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    res["triton"] = triton.__version__
except ImportError:
    res["triton"] = None
ok = True
for name in ("llama-tiny", "dit-tiny"):
    spec = get(name)
    model = spec.build(dtype=torch.bfloat16).to("cuda")
    x = {k: v.cuda() for k, v in spec.example_inputs(batch=2, dtype=torch.bfloat16).items()}
    m = kiln.compile(model, (), x, dynamic=spec.dynamic())
    for b in (1, 3):
        xb = {k: v.cuda() for k, v in spec.example_inputs(batch=b, dtype=torch.bfloat16, seed=b).items()}
        with torch.no_grad():
            err = rel_err(m(**xb), model(**xb))
        res[f"{name}_bs{b}_bf16_relerr_vs_eager"] = err
        ok &= err <= TOL[torch.bfloat16]
    path = os.path.join(os.environ.get("OUT", "/tmp"), f"{name}.kiln")
    m.save(path, overwrite=True)
    m2 = kiln.load(path)
    res[f"{name}_artifact_gpu_arch"] = m2.manifest.get("gpu_arch")
    res[f"{name}_reload_identical"] = bool(torch.equal(m2(**x), m(**x)))
    ok &= res[f"{name}_reload_identical"]
    os.remove(path)
res["ok"] = bool(ok)
print(json.dumps(res, indent=1))
with open(os.path.join(os.environ.get("OUT", "/tmp"), "device_check.json"), "w") as f:
    json.dump(res, f, indent=1)
sys.exit(0 if ok else 1)
