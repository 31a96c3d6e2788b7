"""The activation quantizers of the AQGEMMs on the GPU: ``quantize_rows`` and ``epilogue_codes`` holding whole rows in
registers (one read of the input) against walking each row twice (the maxima, then the codes), at the DiT-XL/2 and
Llama-3.2-1B prefill shapes, bf16.

Each form is timed as the tuner times a candidate (codegen/tuning.py ``time_candidates``: a CUDA graph of back-to-back
runs, medians round-robin), and reported with its effective bandwidth: the bytes it must move (the input once, the
codes and scales written) over its time. The two-walk form is the one-walk form's kernel with ``WHOLE_ROW`` set to 0.

    python3 bench/row_codes.py          (writes $OUT/row_codes.json)
"""
import json
import os

import torch

from kiln.codegen.kernels import epilogue_codes as ec
from kiln.codegen.kernels import quantize_rows as qr
from kiln.codegen.tuning import time_candidates

DEV = torch.device("cuda")
QUANTIZE = [(4096, 1152), (4096, 4608), (2048, 2048), (2048, 8192)]  # DiT batch 8 x CFG: attention out, fc1 out; 1B prefill
EPILOGUE = [  # (m, h's columns, act, glu, scaled): the 1B's gate/up -> down (fp8 and w8a8's int32), DiT's fc1 -> fc2
    (2048, 16384, "silu", True, False), (2048, 16384, "silu", True, True), (4096, 4608, "gelu_tanh", False, False)]


def forms(run):
    def two_walks():
        keep, qr.WHOLE_ROW = qr.WHOLE_ROW, 0
        try:
            run()
        finally:
            qr.WHOLE_ROW = keep
    return {"one-walk": run, "two-walks": two_walks}


def report(name, ms, nbytes, rows):
    line = {k: {"us": round(v * 1e3, 2), "TB_s": round(nbytes / (v * 1e-3) / 1e12, 2)} for k, v in ms.items()}
    rows.append({"what": name, "bytes": nbytes, **line})
    print(f"{name:44s} " + "  ".join(f"{k} {v['us']:7.2f} us {v['TB_s']:5.2f} TB/s" for k, v in line.items()))


rows = []
for fmt in ("fp8", "int8"):
    for m, k in QUANTIZE:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        q, s = torch.empty(m, k, dtype=qr.FORMATS[fmt][0], device=DEV), torch.empty(m, device=DEV)
        ms, failed = time_candidates(forms(lambda: qr.quantize_rows(x, fmt, out=(q, s))), DEV)
        report(f"quantize_rows {fmt} [{m}, {k}]", ms, x.numel() * 2 + q.numel() + m * 4, rows)
    for m, nh, act, glu, scaled in EPILOGUE:
        h = (torch.randint(-3000, 3000, (m, nh), device=DEV, dtype=torch.int32) if scaled
             else torch.randn(m, nh, device=DEV, dtype=torch.bfloat16))
        n = nh // 2 if glu else nh
        kw = dict(xs=torch.rand(m, device=DEV) * 1e-3, ws=torch.rand(nh, device=DEV) * 1e-3, dtype=torch.bfloat16) if scaled else {}
        bias = None if glu else torch.randn(nh, device=DEV, dtype=torch.bfloat16)
        q, s = torch.empty(m, n, dtype=qr.FORMATS[fmt][0], device=DEV), torch.empty(m, device=DEV)
        ms, failed = time_candidates(forms(lambda: ec.epilogue_codes(h, fmt, q, s, bias=bias, act=act, glu=glu, **kw)), DEV)
        kind = "int32" if scaled else "bf16"
        report(f"epilogue_codes {fmt} {kind} [{m}, {nh}] {act}{' glu' if glu else ''}", ms,
               h.numel() * h.element_size() + q.numel() + m * 4, rows)
out = os.path.join(os.environ.get("OUT", "/tmp"), "row_codes.json")
with open(out, "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
print("wrote", out)
