#!/usr/bin/env bash
# The GPU session's runs, by stage: `bash bench/gpu.sh STAGE...` on the device machine (carry .whl: diffusers,
# platformdirs, importlib_metadata, which its image lacks). Logs and JSON go to $OUT; bench/NOTES.md has the record.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/kpkg && ln -sfn "$PWD" /tmp/kpkg/kiln
export PYTHONPATH=/tmp/kpkg:/tmp/site PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 KILN_CACHE_DIR=/tmp/kiln-cache
# Bytecode, as `pip install` writes it for every package: this image sets PYTHONDONTWRITEBYTECODE and its
# site-packages have none, so each process compiled torch's, sympy's and kiln's modules from source (imports 4-9 s
# instead of ~2 s, session 7). All stages run with a bytecode tree, written once a machine (KILN_BENCH_BYTECODE=0: none).
if [ "${KILN_BENCH_BYTECODE:-1}" = 1 ]; then
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX=/tmp/pyc
  if [ ! -d /tmp/pyc ]; then
    python3 -m compileall -q -j 0 -x '(^|/)(tests|bench|\.whl)/' . /tmp/site >/dev/null 2>&1
    timeout 120 python3 -c "import torch, transformers, kiln, torch._dynamo, torch.export; transformers.LlamaForCausalLM" >/dev/null 2>&1
  fi
  echo "bytecode tree: $(find /tmp/pyc -name '*.pyc' | wc -l) files"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ab_decode() {  # TAG SETTING MODEL:QUANT...: batch-1 decode of each against its plans with kiln.codegen SETTING, one process
  local tag=$1 setting=$2 m q; shift 2
  for mq in "$@"; do
    IFS=: read -r m q <<< "$mq"
    DECODE_JSON=decode_${tag}_$m$q.json timeout ${AB_TIMEOUT:-240} python3 bench/decode.py --models $m --batches 1 --quantize $q \
      --no-compile-peer --ab-set $setting 2>&1 | grep "interleaved\|Error\|error\|cold" | tail -12
  done
}
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    kernels)  # the bf16 GPU tests of the decode / quantized GEMMs, the schedulers' CUDA-graph step, GPTQ on CUDA
      timeout 300 python3 -m pytest -q -x -m gpu tests/codegen/test_skinny.py tests/codegen/test_qgemm.py \
        tests/diffusion tests/passes/test_gptq.py 2>&1 | tee "$OUT/kernels.log" | tail -25 ;;
    gpupart)  # PART=I/N: part I of N of the GPU tests (bench/gpu_parts.py: the files dealt by test count), the slowest listed;
      # GPU_WORKERS pytest-xdist processes share the GPU (default 4: the slowest GPU tests compile every config of a kernel,
      # Triton on one core of the machine's 16; session 48, not yet timed; 0: one process, as before)
      IFS=/ read -r i n <<< "${PART:-1/4}"
      workers=${GPU_WORKERS:-4}; xdist=""; [ "$workers" -gt 0 ] && xdist="-n $workers"
      if files=$(python3 bench/gpu_parts.py "$i" "$n"); then
        timeout -s INT ${TESTS_TIMEOUT:-540} python3 -m pytest -q -rf --tb=line -p no:logging -m gpu $xdist $files --durations=15 \
          2>&1 | tee "$OUT/gpupart_${i}of$n.log" | grep -v "Warning\|warn" | tail -30
      fi ;;
    gputests)  # every GPU test
      timeout 540 python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gputests.log" | tail -25 ;;
    models) timeout 420 python3 bench/models.py 2>&1 | tail -20 ;;
    decode_gemm) timeout 300 python3 bench/decode_gemm.py --out "$OUT/decode_gemm.json" --m 1 16 \
        --shapes "1b qkv" "1b down + residual" "8b gate/up glu" 2>&1 | tail -30 ;;
    llm) timeout 420 python3 bench/llm.py 2>&1 | tail -20 ;;
    dit) timeout 420 python3 bench/dit.py --modes eager,reduce-overhead --batches 1,8 2>&1 | tail -20 ;;
    newtests)  # the GPU tests of what landed since the last GPU session (quantized plans, conv / VAE, pipelines, README)
      timeout 420 python3 -m pytest -q -m gpu tests/runtime tests/llm tests/diffusion tests/codegen/test_group_norm.py \
        tests/codegen/test_conv_epilogue.py tests/test_readme.py tests/api 2>&1 | tee "$OUT/newtests.log" | tail -25 ;;
    llm_quant) timeout 540 python3 bench/llm_quant.py 2>&1 | tail -20 ;;
    vae) timeout 300 python3 bench/vae.py 2>&1 | tail -20 ;;
    diffusion_dit) timeout ${DIT_TIMEOUT:-540} python3 bench/diffusion.py --models dit --out "$OUT/diffusion_dit.json" 2>&1 | tee "$OUT/diffusion_dit.log" | tail -25 ;;
    diffusion_pixart) timeout ${PIXART_TIMEOUT:-540} python3 bench/diffusion.py --models pixart --out "$OUT/diffusion_pixart.json" 2>&1 | tail -25 ;;
    diffusion_pixart1024) timeout ${PIXART_TIMEOUT:-540} python3 bench/diffusion.py --models pixart1024 --repeat 3 \
        --out "$OUT/diffusion_pixart1024.json" 2>&1 | tee "$OUT/diffusion_pixart1024.log" | tail -25 ;;
    pixart_diag) timeout 300 python3 bench/pixart_diag.py 2>&1 | grep -v "kept in float32" | tail -14 ;;
    coldstart) timeout 400 python3 bench/coldstart.py 2>&1 | tail -20 ;;
    sessiontests)  # GPU tests of this session's branches (KV cache, norm prologue, quantized plans, pipelines, README)
      timeout 300 python3 -m pytest -q -m gpu tests/codegen/test_attention_kv.py tests/codegen/test_skinny.py \
        tests/llm tests/runtime/test_kernel_plan_quant.py tests/diffusion/test_pipelines.py tests/test_readme.py \
        2>&1 | tee "$OUT/sessiontests.log" | grep -v DEBUG | tail -30 ;;
    decode) timeout 280 python3 bench/decode.py 2>&1 | tail -25 ;;
    llm_kv) timeout 240 python3 bench/llm_kv.py --contexts 2048,8192 --batches 1,16 2>&1 | tail -20 ;;
    llm_quant_1b) timeout 240 python3 bench/llm_quant.py --models 1b 2>&1 | tail -20 ;;
    diffusion_profile) timeout 330 python3 bench/diffusion_profile.py 2>&1 | tee "$OUT/diffusion_profile.log" | tail -62 ;;
    qtests)  # the quantized / rope_kv GPU tests alone, failures printed
      timeout 150 python3 -m pytest -q -x -rf -p no:logging -m gpu tests/runtime/test_kernel_plan_quant.py \
        tests/models/test_gptq.py tests/codegen/test_aqgemm.py tests/codegen/test_rope_kv.py 2>&1 | tee "$OUT/qtests.log" | tail -40 ;;
    qtests2)  # the FP8 / int8 row-quantizer and AQGEMM GPU tests, RoPE + KV-cache writes
      timeout 60 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_aqgemm.py tests/codegen/test_rope_kv.py 2>&1 \
        | tee "$OUT/qtests2.log" | tail -30 ;;
    fp8_gemm) timeout 120 python3 bench/fp8_gemm.py --out "$OUT/fp8_gemm.json" 2>&1 | tail -15 ;;
    decode_1b) timeout 180 python3 bench/decode.py --models 1b 2>&1 | tail -25 ;;
    models_short) timeout 150 python3 bench/models.py 2>&1 | tail -20 ;;
    fp8) timeout ${FP8_TIMEOUT:-300} python3 bench/fp8.py --out "$OUT/fp8.json" 2>&1 | tail -30 ;;
    mergetests)  # GPU tests of the branches merged in session 4 (one-launch split-K, padded LM head, channels-last VAE,
                 # fused activation quantizer)
      timeout 330 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny.py tests/codegen/test_qgemm.py \
        tests/runtime/test_kernel_plan_quant.py tests/llm tests/api/test_gpt2_head.py tests/codegen/test_group_norm.py \
        tests/codegen/test_conv_epilogue.py tests/diffusion/test_vae.py tests/runtime/test_layouts.py \
        tests/codegen/test_act_codes.py tests/runtime/test_kernel_plan_codes.py tests/codegen/test_aqgemm.py 2>&1 \
        | tee "$OUT/mergetests.log" | grep -v DEBUG | tail -40 ;;
    mergetests2)  # the part of mergetests that run 1 of session 4 did not reach (its 330 s ran out after 69 passed)
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rf -p no:logging -m gpu tests/llm tests/api/test_gpt2_head.py \
        tests/codegen/test_group_norm.py tests/codegen/test_conv_epilogue.py tests/diffusion/test_vae.py \
        tests/runtime/test_layouts.py tests/codegen/test_act_codes.py tests/runtime/test_kernel_plan_codes.py \
        tests/codegen/test_aqgemm.py 2>&1 | tee "$OUT/mergetests2.log" | grep -v DEBUG | tail -40 ;;
    codestests) timeout 100 python3 -m pytest -q -rf -p no:logging -m gpu tests/runtime/test_kernel_plan_codes.py 2>&1 \
        | tee "$OUT/codestests.log" | grep -v DEBUG | tail -15 ;;
    gpt2) timeout 150 python3 bench/models.py --models gpt2 2>&1 | tail -12 ;;
    decode_1b_profile) timeout 170 python3 bench/decode.py --models 1b --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"' | tail -8 ;;
    vae256) timeout 130 python3 bench/vae.py --sizes 32 --modes eager,reduce-overhead 2>&1 | tee "$OUT/vae256.log" | tail -12 ;;
    pdl)  # programmatic dependent launch: its GPU test, then the 1B decode off, on, on + weight prefetch (same tokens)
      timeout 120 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_pdl.py 2>&1 | tee "$OUT/pdl_test.log" \
        | grep -v DEBUG | tail -8
      for f in 0 1 prefetch; do KILN_PDL=$f DECODE_JSON=decode_pdl$f.json timeout 150 python3 bench/decode.py --models 1b \
        --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"' | tail -3; done ;;
    s5tests)  # GPU tests of session 4's late changes: PDL (default on; the quantized plans too), cold decode-GEMM timing, one-launch decode
              # attention, the decode plans (tokens vs transformers)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_pdl.py \
        tests/codegen/test_tuning.py tests/codegen/test_decode_attention.py tests/llm/test_generator.py \
        tests/llm/test_decode_plan.py tests/runtime/test_kernel_plan_quant.py 2>&1 | tee "$OUT/s5tests.log" | grep -v DEBUG | tail -30 ;;
    decode_8b) timeout 240 python3 bench/decode.py --models 8b --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"' | tail -8 ;;
    diffusion_dit_fp8)  # the DiT pipeline with its step graph in fp8: PSNR vs kiln bf16 (issue 14), no torch.compile peer
      timeout 400 python3 bench/diffusion.py --models dit --batches 1 --compile-modes '' --quantize fp8 \
        --out "$OUT/diffusion_dit_fp8.json" 2>&1 | tail -20 ;;
    gemv_sweep)  # the bf16 GEMV template's tiles at the 1B decode shapes, M = 1 (what the template can reach)
      timeout ${SWEEP_TIMEOUT:-250} python3 bench/decode_gemm.py --out "$OUT/gemv_sweep.json" --m 1 --sweep \
        --shapes "1b gate/up glu" "1b down + residual" "1b lm head" "1b qkv" "1b o + residual" 2>&1 | tail -12 ;;
    coldstart_1b) timeout 300 python3 bench/coldstart.py --model llama-1b 2>&1 | tail -6 ;;
    tuningtest) timeout 90 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_tuning.py 2>&1 | grep -v DEBUG | tail -4 ;;
    decode_long)  # a user's cache length: the 1B at max_seq 4096 (decode attention must not read the empty slots)
      DECODE_JSON=decode_long.json timeout 200 python3 bench/decode.py --models 1b --no-compile-peer --max-seq 4096 2>&1 \
        | grep -v '^ *\[\|^ *"' | tail -4 ;;
    s5final)  # GPU tests of session 5's kernels: decode attention over the attended keys only, the channels-last group norm
      timeout 100 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_decode_attention.py \
        tests/codegen/test_group_norm.py 2>&1 | tee "$OUT/s5final.log" | grep -v DEBUG | tail -8 ;;
    tritoninfo)  # what this Triton has of the APIs session 6's work relies on (JIT cache hook + preload, inline asm)
      python3 - <<'PY' 2>&1 | tail -12
import inspect, triton
from triton.runtime import jit
print("triton", triton.__version__, "knobs.runtime.jit_cache_hook:", hasattr(getattr(triton, "knobs", None), "runtime")
      and hasattr(triton.knobs.runtime, "jit_cache_hook"))
src = inspect.getsource(jit.JITFunction)
print("preload:", "def preload" in src, "specialization_data in _call_hook:", "'specialization_data'" in src)
print([l.strip() for l in inspect.getsource(jit.JITFunction.preload).splitlines() if "constexpr" in l or "target" in l][:8])
PY
      ;;
    s6tests)  # GPU tests of session 6's merges: L2 weight prefetch (KILN_PDL=l2), swapped skinny tiles, compile survey + workers
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_l2_prefetch.py \
        tests/codegen/test_pdl.py tests/runtime/test_kernel_plan_survey.py tests/codegen/test_compile_pool.py \
        tests/codegen/test_tuning.py tests/codegen/test_skinny.py tests/llm/test_decode_plan.py 2>&1 | tee "$OUT/s6tests.log" \
        | grep -v DEBUG | tail -30 ;;
    decode_l2)  # the 1B decode (batch 1 and 16) with PDL on, + L2 weight prefetch 32 KB / 64 KB a program (same tokens)
      for f in 1 l2 l2:64; do KILN_PDL=$f DECODE_JSON=decode_pdl_$f.json timeout 150 python3 bench/decode.py --models 1b \
        --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"' | tail -3; done ;;
    coldstart_1b_w0)  # A/B of coldstart_1b: candidates compiled from threads, no worker processes
      KILN_COMPILE_WORKERS=0 timeout 300 python3 bench/coldstart.py --model llama-1b --tag _w0 2>&1 | tail -6 ;;
    vae1024) timeout 200 python3 bench/vae.py --sizes 32,128 --modes eager,reduce-overhead 2>&1 | tail -12 ;;
    m16_sweep)  # the skinny tiles (swapped ones included) at the 1B's layer shapes, M = 16
      timeout ${SWEEP_TIMEOUT:-250} python3 bench/decode_gemm.py --out "$OUT/m16_sweep.json" --m 16 --sweep \
        --shapes "1b qkv" "1b o + residual" "1b down + residual" "1b gate/up glu" 2>&1 | tail -12 ;;
    s7tests)  # GPU tests of session 7's changes: libraries warmed at load, tree-hashed artifacts, the compile workers
      timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -rf -p no:logging -m gpu tests/runtime/test_warm_libs.py \
        tests/runtime/test_artifact.py tests/codegen/test_compile_pool.py tests/runtime/test_kernel_plan_survey.py \
        tests/llm 2>&1 | tee "$OUT/s7tests.log" | grep -v DEBUG | tail -12 ;;
    norm16)  # task A: the fused RMSNorm prologue's GPU tests, then its candidates timed as the tuner does (M = 16 and 1)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny.py -k norm 2>&1 | grep -v DEBUG | tail -4
      timeout 120 python3 bench/decode_gemm.py --norm --m 16 1 --out "$OUT/norm16.json" 2>&1 | tail -14 ;;
    imports)  # what `import torch` and `import kiln` cost on this machine (twice: the second with a warm page cache)
      for i in 1 2; do python3 -c "import time; t = time.time(); import torch; a = time.time(); import kiln; b = time.time()
print(f'import torch {a - t:.2f} s, kiln {b - a:.2f} s'); t = time.time(); torch.zeros(1, device='cuda'); print(f'cuda init {time.time() - t:.2f} s')"
      done
      python3 -X importtime -c "import kiln" 2> "$OUT/importtime.txt" ;;
    decode_q)  # the 1B's quantized decode step at batch 1, launch by launch (where a w4a16 / w8a16 step's 0.9 ms go)
      for q in w4a16 w8a16; do DECODE_JSON=decode_$q.json timeout 200 python3 bench/decode.py --models 1b --batches 1 \
        --quantize $q --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"' | tail -4; done ;;
    qwords)  # the WORDS GEMV's GPU tests (every M = 1 config of a quantized weight, the norm prologue), the survey after
             # other plans started the compile workers
      timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny.py -k "words or every_config" \
        tests/runtime/test_warm_libs.py tests/runtime/test_kernel_plan_survey.py 2>&1 | tee "$OUT/qwords.log" | grep -v DEBUG | tail -6 ;;
    ncu_gemv)  # Nsight Compute on one int4 / int8 gate/up GEMV per skinny config (warp stalls, occupancy, bytes in flight)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout 240 "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis python3 bench/gemv_ncu.py > "$OUT/ncu_gemv.txt" 2>&1
      grep -E "^int[48] |Duration|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued|Registers Per" "$OUT/ncu_gemv.txt" | head -60 ;;
    gptq_1b)  # issue 13's cold compile with GPTQ calibration of the 1B (goal <= 60 s): fresh kiln and Triton caches
      TRITON_CACHE_DIR=$(mktemp -d) KILN_CACHE_DIR=$(mktemp -d) timeout 300 python3 bench/llm_quant.py --models 1b \
        --modes w4a16-gptq --out "$OUT/gptq_1b.json" 2>&1 | grep "tok/s" | tail -4 ;;
    qwords2)  # the skinny GPU tests of every M = 1 config (the WORDS tiles as skinny.TILES lists them) and the WORDS tiles
      timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny.py -k "words or every_config" \
        2>&1 | tee "$OUT/qwords2.log" | grep -v DEBUG | tail -4 ;;
    qsweep)  # the M = 1 GEMV on int4 / int8 weights: skinny's configs and SWEEP_WORDS_TILES at the 1B's largest shapes
      timeout ${SWEEP_TIMEOUT:-240} python3 bench/decode_gemm.py --out "$OUT/qsweep.json" --m 1 --sweep --kinds int4_g128 int8 \
        --shapes "1b gate/up glu" "1b down + residual" "1b qkv" 2>&1 | grep -v "^    [0-9]" | tail -8 ;;
    qcap)  # session 9: the register cap (skinny.Tile.maxnreg) both ways at the 1B's two largest one-row quantized GEMVs
      timeout ${SWEEP_TIMEOUT:-240} python3 bench/decode_gemm.py --out "$OUT/qcap.json" --m 1 --sweep --kinds int4_g128 int8 \
        --shapes "1b gate/up glu" "1b down + residual" 2>&1 | grep -v "^    [0-9]" | tail -8 ;;
    attntests)  # session 10: the flash-attention template's GPU tests (head dim 72 as 64 + 16 lanes), failures printed
      timeout 360 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_attention.py \
        tests/codegen/test_attention_kv.py 2>&1 | grep -v DEBUG | tail -6 ;;
    attn) timeout 200 python3 bench/attn.py 2>&1 | tail -45 ;;  # attention at DiT / PixArt shapes, each candidate in a CUDA graph
    rows) timeout 240 python3 bench/rows.py 2>&1 | tee "$OUT/rows.log" | tail -20 ;;  # DiT step's pointwise kernels per tile policy
    gemm_mid)  # session 11: the persistent split-K / stream-K Triton GEMM against cuBLAS at DiT / prefill shapes, CUDA graphs
      timeout ${GEMM_TIMEOUT:-240} python3 bench/gemm_mid.py --shapes "dit512 qkv" "dit512 proj" "dit512 fc1" "dit512 fc2" \
        "dit4096 fc1" "dit4096 fc2" "llama2048 down" 2>&1 | tee "$OUT/gemm_mid.log" | tail -60 ;;
    s11tests)  # session 11: diffusers' noise drawn into pinned memory, the DiT-XL/2 pipeline against diffusers after the host changes
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/diffusion/test_pipelines.py 2>&1 \
        | tee "$OUT/s11tests.log" | grep -v DEBUG | tail -6 ;;
    llm_quant_8b) timeout 400 python3 bench/llm_quant.py --models 8b --out "$OUT/llm_quant_8b.json" 2>&1 | tail -20 ;;  # issue 13's 8B w8a16 / w4a16 goals
    s12)  # session 12: HF's causal mask folded when a plan is built (attention runs causal): GPU tests, the 1B prefill 2048
          # (bf16 / fp8 / w8a8, kernel breakdowns), the 1B prefill against torch.compile, GPT-2 (its mask too)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/runtime/test_kernel_plan.py 2>&1 \
        | tee "$OUT/s12tests.log" | grep -v DEBUG | tail -6
      timeout 200 python3 bench/fp8.py --parts llm --out "$OUT/fp8_llm.json" 2>&1 | grep -v "^ *{'x'" | tail -60
      timeout 150 python3 bench/llama_prefill.py --modes eager,reduce-overhead --seqs 2048 2>&1 | tail -8
      timeout 120 python3 bench/models.py --models gpt2 2>&1 | tail -8 ;;
    s14a)  # session 14: the MAGIC tiles (4-bit codes for the tensor cores at 1..16 rows): their GPU tests, the int4 decode
           # GEMMs per config (1B, 8B), the 1B w4a16 decode step, the 8B w4a16 decode (issue 13's 650 tok/s goal)
      timeout 170 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny_magic.py 2>&1 \
        | tee "$OUT/s14tests.log" | grep -v DEBUG | tail -8
      timeout 200 python3 bench/decode_gemm.py --out "$OUT/magic_gemm.json" --m 1 16 --kinds int4_g128 --shapes "1b gate/up glu" \
        "1b down + residual" "1b qkv" "8b gate/up glu" "8b down + residual" 2>&1 | tail -12
      DECODE_JSON=decode_w4a16.json timeout 150 python3 bench/decode.py --models 1b --batches 1 --quantize w4a16 \
        --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"' | tail -4
      timeout 200 python3 bench/llm_quant.py --models 8b --modes w4a16 --out "$OUT/llm_quant_8b.json" 2>&1 | tail -8 ;;
    s14b)  # session 14: NORM_POST (the norm's statistics summed in the skinny loop, no pass before it): its GPU tests, the
           # norm-fed decode GEMMs' candidates timed (1 and 16 rows), the 1B bf16 decode at batch 1 and 16, the 1B w4a16
           # decode at batch 1 and 16 (MAGIC at 16 rows) and the 8B w4a16
      timeout 120 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny_norm_post.py 2>&1 \
        | tee "$OUT/s14btests.log" | grep -v DEBUG | tail -6
      timeout 150 python3 bench/decode_gemm.py --norm --m 1 16 --out "$OUT/norm_post.json" 2>&1 | tail -14
      DECODE_JSON=decode_bf16.json timeout 150 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer 2>&1 \
        | grep -v '^ *\[\|^ *"' | tail -6
      timeout 170 python3 bench/llm_quant.py --models 1b,8b --modes w4a16 --out "$OUT/llm_quant_w4.json" 2>&1 | tail -8 ;;
    s14c)  # session 14: the bf16 skinny tiles at 16 rows (o, down, gate/up): where the batch-16 step's GEMMs lose bandwidth
      timeout 330 python3 bench/decode_gemm.py --m 16 --sweep --kinds bf16 --out "$OUT/sweep16.json" \
        --shapes "1b down + residual" "1b o + residual" "1b gate/up glu" 2>&1 | grep -v "^    [0-9]" | tail -8 ;;
    s14d)  # session 14: MAGIC tiles on mma.sync (2 warps): GPU tests, int4 one-row GEMMs per config, 1B / 8B w4a16 decode
      timeout 200 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny_magic.py 2>&1 \
        | tee "$OUT/s14dtests.log" | grep -v DEBUG | tail -6
      timeout 150 python3 bench/decode_gemm.py --out "$OUT/magic2.json" --m 1 --kinds int4_g128 --shapes "1b gate/up glu" \
        "1b down + residual" "8b gate/up glu" "8b down + residual" 2>&1 | tail -6
      timeout 170 python3 bench/llm_quant.py --models 1b,8b --modes w4a16 --out "$OUT/llm_quant_w4b.json" 2>&1 | tail -4 ;;
    s14e)  # session 14: the GEMM template with the norm in its loop ("triton-norm"): GPU tests, the 16-row gate/up's candidates,
           # the 1B bf16 decode at batch 1 and 16, the 1B prefill 2048 against torch.compile
      timeout 120 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny_norm_post.py 2>&1 \
        | tee "$OUT/s14etests.log" | grep -v DEBUG | tail -6
      timeout 100 python3 bench/decode_gemm.py --norm --m 16 --shapes "1b gate/up glu" --out "$OUT/norm16e.json" 2>&1 | tail -8
      DECODE_JSON=decode_bf16e.json timeout 150 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer 2>&1 \
        | grep -v '^ *\[\|^ *"' | tail -6
      timeout 150 python3 bench/llama_prefill.py --modes reduce-overhead --seqs 2048 2>&1 | tail -5 ;;
    s15a)  # session 15: AQGEMM epilogues storing the next AQGEMM's codes (kernels/epilogue_codes.py; the MLP's hidden value
           # never stored in bf16): GPU tests, then DiT-XL/2 and the 1B prefill 2048 in bf16 / fp8 / w8a8 (issue 14)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_epilogue_codes.py \
        tests/runtime/test_kernel_plan_codes.py 2>&1 | tee "$OUT/s15atests.log" | grep -v DEBUG | tail -6
      timeout 330 python3 bench/fp8.py --out "$OUT/fp8.json" 2>&1 | tail -40 ;;
    s16a)  # session 16: the tuner charging decode candidates 2 us a launch past their first (tuning.EXTRA_LAUNCH_MS): the
           # 1B bf16 decode at batch 1 and 16 (kernels a step: 121 or fewer at batch 1)
      DECODE_JSON=decode_bf16_16a.json timeout 200 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer 2>&1 \
        | grep -v '^ *\[\|^ *"' | tail -8 ;;
    s16b)  # session 16: the row quantizers holding whole rows (one read): GPU tests, quantize_rows / epilogue_codes one walk vs
           # two at DiT / 1B prefill shapes, then DiT-XL/2 and the 1B prefill 2048 in bf16 / fp8 / w8a8 (issue 14)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_epilogue_codes.py tests/codegen/test_aqgemm.py \
        -k "codes or rows" 2>&1 | tee "$OUT/s16btests.log" | grep -v DEBUG | tail -6
      timeout 120 python3 bench/row_codes.py 2>&1 | tail -16
      timeout 330 python3 bench/fp8.py --out "$OUT/fp8b.json" 2>&1 | tail -2 ;;
    s16c)  # session 16: the row quantizers' division as a reciprocal + Markstein's correction (17 SASS instructions an
           # element, not 28): GPU tests, bench/row_codes.py, DiT-XL/2 and the 1B prefill in bf16 / fp8 / w8a8 (issue 14)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_epilogue_codes.py tests/codegen/test_aqgemm.py \
        tests/runtime/test_kernel_plan_codes.py 2>&1 | tee "$OUT/s16ctests.log" | grep -v DEBUG | tail -6
      timeout 120 python3 bench/row_codes.py 2>&1 | tail -16
      timeout 330 python3 bench/fp8.py --out "$OUT/fp8c.json" 2>&1 | tail -2 ;;
    s16d)  # session 16: the AQGEMM tile filling the last wave best (aqgemm.wave_fit) among the tuner's candidates: GPU tests of
           # the template, DiT-XL/2 and the 1B prefill in bf16 / fp8 / w8a8 (issue 14)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_aqgemm.py 2>&1 | tee "$OUT/s16dtests.log" \
        | grep -v DEBUG | tail -4
      timeout 330 python3 bench/fp8.py --out "$OUT/fp8d.json" 2>&1 | tail -2 ;;
    s16e)  # session 16: MAGIC tiles with twice their splits at one row (tried in 585966f and taken out again: 31.7 vs WORDS 27.0 us): the
           # 8B int4 gate/up and down per config, the 8B w4a16 decode (issue 13's 650 tok/s goal), the MAGIC GPU tests
      timeout 100 python3 bench/decode_gemm.py --out "$OUT/magic_split.json" --m 1 --kinds int4_g128 --shapes "8b gate/up glu" \
        "8b down + residual" 2>&1 | tail -6
      timeout 170 python3 bench/llm_quant.py --models 8b --modes w4a16 --out "$OUT/llm_quant_8b_16e.json" 2>&1 | tail -4
      timeout 100 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_skinny_magic.py 2>&1 \
        | tee "$OUT/s16etests.log" | grep -v DEBUG | tail -4 ;;
    s16f)  # session 16: a GEMM's output written over its residual (no copy before cuBLAS's beta-add): the kernels plans' GPU
           # tests (bf16, CUDA graphs, every GEMM choice), the 1B prefill 2048 in bf16 / fp8 / w8a8 and against torch.compile
      timeout 90 python3 -m pytest -q -rf -p no:logging -m gpu tests/runtime/test_kernel_plan.py 2>&1 | tee "$OUT/s16ftests.log" \
        | grep -v DEBUG | tail -4
      timeout 110 python3 bench/fp8.py --parts llm --out "$OUT/fp8f.json" 2>&1 | tail -1
      timeout 120 python3 bench/llama_prefill.py --modes reduce-overhead --seqs 2048 2>&1 | tail -4 ;;
    s17a)  # session 17: the persistent TMA GEMM template (kernels/tma_gemm.py): its GPU tests and the AQGEMM candidates', then
           # every config at DiT-XL/2 / 1B prefill shapes against the pointer templates, scaled_mm / int_mm and cuBLAS bf16
      timeout 200 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_tma_gemm.py tests/codegen/test_aqgemm.py \
        2>&1 | tee "$OUT/s17atests.log" | grep -v DEBUG | tail -8
      timeout 330 python3 bench/fp8_gemm.py --out "$OUT/fp8_gemm17a.json" 2>&1 | tail -14 ;;
    s17b)  # session 17: DiT-XL/2 and the 1B prefill 2048 in bf16 / fp8 / w8a8 with the TMA template among the AQGEMM candidates
           # (issue 14), then attention at head dim 72 with SDPA on q, k, v zero-padded to 80 / 96 / 128 (issue 15's PixArt 1024)
      timeout 330 python3 bench/fp8.py --out "$OUT/fp8_17b.json" 2>&1 | tail -24
      timeout 200 python3 bench/attn.py 2>&1 | tail -60 ;;
    s17c)  # session 17: generated pointwise / norm kernels of <= 16 rows with PDL (KILN_PDL=pointwise:16) against without, the
           # 1B bf16 decode at batch 1 and 16 (issue 13: 14,000 tok/s at batch 16), two processes
      for v in 1 1+pointwise:16; do
        KILN_PDL=$v DECODE_JSON=decode_17c_${v#1+}.json timeout 200 python3 bench/decode.py --models 1b --batches 1,16 \
          --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"' | tail -5
      done ;;
    s17d)  # session 17: the 1B bf16 decode at batch 1 and 16 with the one-split decode attention never offered (its decision is
           # timed at the prompt's keys; the step runs up to the cache's 384), against s17c's default run
      DECODE_JSON=decode_17d_nowhole.json timeout 200 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer \
        --whole-max-keys 0 2>&1 | grep -v '^ *\[\|^ *"' | tail -3
      python3 -c "import json; d = json.load(open('$OUT/decode_17d_nowhole.json'))['1b']; [print(b, {k: d[b]['kiln'][k] for k in \
        ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', 'choices')}) for b in ('bs1', 'bs16')]" ;;
    s17e)  # session 17: the decode attention timed at the prompt's keys and at the whole cache (lower.attention): GPU tests of
           # the decode attention and the kernels plans, then the 1B bf16 decode at batch 1 and 16 (against s17c / s17d)
      timeout 120 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_attention_kv.py tests/codegen/test_pdl.py \
        2>&1 | tee "$OUT/s17etests.log" | grep -v DEBUG | tail -3
      DECODE_JSON=decode_17e.json timeout 200 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer 2>&1 \
        | grep -v '^ *\[\|^ *"' | tail -2
      python3 -c "import json; d = json.load(open('$OUT/decode_17e.json'))['1b']; [print(b, {k: d[b]['kiln'][k] for k in \
        ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', 'choices')}) for b in ('bs1', 'bs16')]" ;;
    ncu_magic)  # Nsight Compute on the 8B int4 gate/up at one row, every skinny config (WORDS, byte tiles, MAGIC)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout 150 "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis python3 bench/gemv_ncu.py --shape 8b \
        --bits 4 > "$OUT/ncu_magic.txt" 2>&1
      grep -E "^int[48] |Duration|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued|Registers Per" "$OUT/ncu_magic.txt" | head -60 ;;
    s18a)  # session 18: norm weights folded into the GEMM weights (passes/fold_norm_weight.py) and the template scaling its
           # rows by the weightless norm's 1 / rms (RSTD): GPU tests, the 16-row / 1-row norm-fed GEMMs cold, then the 1B bf16
           # decode at batch 1 and 16 with and without the pass in ONE process (issue 13: 14,000 tok/s at batch 16)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_gemm.py tests/runtime/test_kernel_plan.py \
        2>&1 | tee "$OUT/s18atests.log" | grep -v DEBUG | tail -4
      timeout 150 python3 bench/decode_gemm.py --out "$OUT/norm_18a.json" --norm --m 16 1 2>&1 | grep -v "^        " | tail -24
      DECODE_JSON=decode_18a.json timeout 330 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer \
        --ab-disable fold_norm_weight 2>&1 | grep "interleaved" | tail -4
      python3 -c "import json; d = json.load(open('$OUT/decode_18a.json'))['1b']; [print(b, v, {k: d[b][v][k] for k in \
        ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', 'choices')}) for b in ('bs1', 'bs16') \
        for v in ('kiln', 'kiln_variant')]" ;;
    s18b)  # session 18: RSTD from 2 rows (at one row it lost in the step); the GPU tests s18a's limit cut; the 1B bf16 decode
           # with and without the one-split decode attention in ONE process, and what runs between two step replays
      timeout 200 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_gemm.py tests/runtime/test_kernel_plan.py \
        2>&1 | tee "$OUT/s18btests.log" | grep -v DEBUG | tail -4
      DECODE_JSON=decode_18b.json timeout 330 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer \
        --ab-whole-max-keys 0 2>&1 | grep "interleaved" | tail -4
      python3 -c "import json; d = json.load(open('$OUT/decode_18b.json'))['1b']; [print(b, v, {k: d[b][v][k] for k in \
        ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', 'between_steps_us', 'choices')}) for b in ('bs1', 'bs16') \
        for v in ('kiln', 'kiln_variant')]" ;;
    s18c)  # session 18: the greedy token and the step's input updates in one kernel (codegen/kernels/greedy.py), the one-split
           # decode attention offered up to 256 slots: GPU tests, then the 1B decode in bf16 (batch 1, 16) and w4a16 (batch 1)
      timeout 200 python3 -m pytest -q -rf -p no:logging -m gpu tests/codegen/test_greedy.py tests/codegen/test_gemm.py \
        tests/llm/test_generator.py 2>&1 | tee "$OUT/s18ctests.log" | grep -v DEBUG | tail -4
      for q in none w4a16; do
        [ $q = none ] && args="--batches 1,16" || args="--batches 1 --quantize $q"
        DECODE_JSON=decode_18c_$q.json timeout 200 python3 bench/decode.py --models 1b $args --no-compile-peer 2>&1 | tail -0
        python3 -c "import json; d = json.load(open('$OUT/decode_18c_$q.json'))['1b']; [print('$q', b, {k: d[b]['kiln'][k] for k in \
          ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', 'between_steps_us', 'choices')}) for b in d if b.startswith('bs')]"
      done ;;
    s18d)  # session 18: s18c again with every error shown (its decode runs failed with their output hidden)
      timeout 60 python3 -c "
import torch; from kiln.codegen.kernels.greedy import greedy
x = torch.randn(16, 128256, device='cuda', dtype=torch.bfloat16)
print('greedy', greedy(x).tolist() == x.argmax(-1).tolist())" 2>&1 | tail -5
      timeout 60 python3 -m pytest -q -x -rf -p no:logging -m gpu tests/codegen/test_greedy.py 2>&1 | tail -5
      DECODE_JSON=decode_18d.json timeout 150 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer 2>&1 \
        | grep -v '^ *\[\|^ *"\|^1b ' | tail -25
      python3 -c "import json; d = json.load(open('$OUT/decode_18d.json'))['1b']; [print(b, {k: d[b]['kiln'][k] for k in \
        ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', 'between_steps_us', 'choices')}) for b in d if b.startswith('bs')]" ;;
    s18e)  # session 18: the greedy kernel with each row cut into up to 32 programs (one a row took ~30 us): its GPU tests,
           # the 1B decode in bf16 (batch 1, 16) and w4a16 (batch 1)
      timeout 60 python3 -m pytest -q -x -rf -p no:logging -m gpu tests/codegen/test_greedy.py 2>&1 | tail -2
      DECODE_JSON=decode_18e.json timeout 150 python3 bench/decode.py --models 1b --batches 1,16 --no-compile-peer 2>&1 \
        | grep -v '^ *\[\|^ *"\|^1b ' | tail -3
      DECODE_JSON=decode_18e_w4.json timeout 150 python3 bench/decode.py --models 1b --batches 1 --quantize w4a16 \
        --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"\|^1b ' | tail -3
      for f in decode_18e decode_18e_w4; do python3 -c "import json; d = json.load(open('$OUT/$f.json'))['1b']; \
        [print('$f', b, {k: d[b]['kiln'][k] for k in ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', \
        'between_steps_us', 'choices')}) for b in d if b.startswith('bs')]"; done ;;
    s18f)  # session 18: the generator's greedy path on the GPU (bf16, CUDA graphs: tokens against transformers'), then the
           # 1B bf16 decode at batch 16 again (a second sample of s18e's)
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/llm/test_generator.py 2>&1 | grep -v DEBUG | tail -3
      DECODE_JSON=decode_18f.json timeout 120 python3 bench/decode.py --models 1b --batches 16 --no-compile-peer 2>&1 \
        | grep -v '^ *\[\|^ *"\|^1b ' | tail -2
      python3 -c "import json; d = json.load(open('$OUT/decode_18f.json'))['1b']; [print(b, {k: d[b]['kiln'][k] for k in \
        ('decode_tok_s', 'step_ms', 'step_ms_last', 'between_steps_us', 'choices')}) for b in d if b.startswith('bs')]" ;;
    s19a)  # next: the 1B bf16 decode at batch 16, the tuned plan against each decode attention forced, in one process each
           # (issue 13: 13,943-13,996 tok/s against 14,000; the candidates time within ~1 us alone, 2-4% apart in the step)
      for att in kiln-decode kiln-decode-last; do
        DECODE_JSON=decode_19a_$att.json timeout 200 python3 bench/decode.py --models 1b --batches 16 --no-compile-peer \
          --ab-kernels attention=$att 2>&1 | grep "interleaved" | tail -1
      done ;;
    s19c)  # session 19: the decode attention taking its rope_kv call over (RoPE + cache writes in its launch) and its last
           # program reducing a group's rows at once: GPU tests, then the 1B bf16 decode at batch 1 / 16, the tuned plan
           # against the old pair (rope_kv kernel, then the split kernel: attention=kiln-decode), one process each
      timeout 150 python3 -m pytest -q -x -rf -p no:logging -m gpu tests/codegen/test_decode_attention_rope.py \
        tests/codegen/test_decode_attention.py 2>&1 | tail -3
      for b in 1 16; do
        DECODE_JSON=decode_19c_$b.json timeout 200 python3 bench/decode.py --models 1b --batches $b --no-compile-peer \
          --ab-kernels attention=kiln-decode 2>&1 | grep "interleaved\|Error\|error" | tail -3
        python3 -c "import json; d = json.load(open('$OUT/decode_19c_$b.json'))['1b']['bs$b']; [print(v, {k: d[v].get(k) for k in \
          ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernels_per_step', 'choices')}) for v in ('kiln', 'kiln_variant')]"
      done ;;
    s19d)  # session 19: the generator's GPU tests (tokens against transformers') with the rope-fused attention
      timeout 150 python3 -m pytest -q -rf -p no:logging -m gpu tests/llm/test_generator.py tests/llm/test_decode_plan.py \
        2>&1 | grep -v DEBUG | tail -3 ;;
    s19e)  # session 19: the 1B quantized decode at batch 1 with the rope-fused attention (w4a16 1,455, w8a16 ~1,240 before)
      for q in w8a16 w4a16; do
        DECODE_JSON=decode_19e_$q.json timeout 150 python3 bench/decode.py --models 1b --batches 1 --quantize $q \
          --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"\|^1b ' | tail -2
        python3 -c "import json; d = json.load(open('$OUT/decode_19e_$q.json'))['1b']['bs1']['kiln']; print('$q', \
          {k: d[k] for k in ('decode_tok_s', 'step_ms', 'kernels_per_step', 'kernel_top', 'choices')})"
      done ;;
    s19f)  # session 19: the rope-fused decode attention's mask scan and first K / V tile before its PDL wait (EARLY_KV):
           # GPU tests, then the 1B decode (bf16 batch 1 / 16, w4a16 batch 1) against EARLY_KV=0 in one process each
      timeout 120 python3 -m pytest -q -x -rf -p no:logging -m gpu tests/codegen/test_decode_attention_rope.py 2>&1 | tail -2
      for c in "1 bf16" "16 bf16" "1 w4a16"; do set -- $c
        q=$([ $2 = bf16 ] || echo "--quantize $2")
        DECODE_JSON=decode_19f_$1_$2.json timeout 150 python3 bench/decode.py --models 1b --batches $1 $q --no-compile-peer \
          --ab-set EARLY_KV=0 2>&1 | grep "interleaved\|Error\|error" | tail -3
        python3 -c "import json; d = json.load(open('$OUT/decode_19f_$1_$2.json'))['1b']['bs$1']; [print('$2', v, {k: d[v].get(k) \
          for k in ('decode_tok_s', 'step_ms', 'step_ms_last', 'kernel_top')}) for v in ('kiln', 'kiln_variant')]"
      done ;;
    s19g)  # session 19: the weight-streaming GEMVs' first weight tiles before their PDL wait (KILN_PDL=prefetch, off by
           # default since session 5's two-process -13 us) in one process, at batch 1 (bf16, w4a16); the 8B w4a16 figure
      for q in bf16 w4a16; do
        qa=$([ $q = bf16 ] || echo "--quantize $q")
        DECODE_JSON=decode_19g_$q.json timeout 150 python3 bench/decode.py --models 1b --batches 1 $qa --no-compile-peer \
          --ab-env "KILN_PDL=1+prefetch" 2>&1 | grep "interleaved\|Error\|error" | tail -3
      done
      DECODE_JSON=decode_19g_8b.json timeout 200 python3 bench/decode.py --models 8b --batches 1 --quantize w4a16 \
        --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"\|^8b ' | tail -2
      python3 -c "import json; d = json.load(open('$OUT/decode_19g_8b.json'))['8b']['bs1']['kiln']; print('8b w4a16', \
        {k: d[k] for k in ('decode_tok_s', 'step_ms', 'kernel_top')})" ;;
    s19h)  # session 19: the weight-streaming GEMVs' prefetch on by default: the 1B bf16 decode at batch 1 / 16 against
           # KILN_PDL=1+noprefetch, one process each
      for b in 1 16; do
        DECODE_JSON=decode_19h_$b.json timeout 150 python3 bench/decode.py --models 1b --batches $b --no-compile-peer \
          --ab-env "KILN_PDL=1+noprefetch" 2>&1 | grep "interleaved\|Error\|error" | tail -3
      done ;;
    s23a)  # session 23: s22b (the 1B w4a16 with / without IDOT) and s21a (NORM_POST's GPU tests, the 8B w8a16 with / without
      # the WORDS NORM_POST candidates), then the gate/up decisions those plans made, every candidate's cold time (why
      # the norm stays fused in the GEMV: s20f's question)
      bash "$0" s22b s21a 2>&1 | grep -v "^bytecode\|^NVIDIA"
      python3 bench/tuning_dump.py "$KILN_CACHE_DIR" --rows 28672 --top 14 | tee "$OUT/tuning_23a_8b.txt"
      python3 bench/tuning_dump.py "$KILN_CACHE_DIR" --rows 16384 --top 10 | tee "$OUT/tuning_23a_1b.txt" ;;
    s24t)  # next: session 23's CPU work on CUDA: Phi-3 with LongRoPE (rows prefilled again past the original length),
      # Phi-4-mini's partial rotary and SmolLM3's NoPE layers, bf16 tokens against transformers' with CUDA graphs; and
      # session 25's act-order GPTQ checkpoints (x gathered before the QGEMMs) against the eager dequantized model
      timeout 150 python3 -m pytest -q -rf -m gpu tests/llm/test_generator.py -k "Phi3 or SmolLM3" 2>&1 | tail -3
      timeout 120 python3 -m pytest -q -rf -m gpu tests/models/test_gptq.py 2>&1 | tail -3 ;;
    s24a)  # next: the decode attention's phases at batch 1 (bench/decode_attn.py: each form a plan can run, cold and warm as
      # the tuner times them, beside an empty kernel timed the same way), the 1B / 8B / Qwen3-0.6B shapes, 384 slots
      timeout 240 python3 bench/decode_attn.py 2>&1 | tail -75 ;;
    s24l)  # next: the load-only ceiling of the one-row GEMVs' weight streams (bench/gemv_loads.py): every tile shape,
      # the weight row-major (as today: 256-byte segments a row a step at the quantized tiles) against laid out tile by
      # tile (a step one contiguous block), cold, at the 8B's int8 / int4 gate/up and int4 down and the 1B's int4 gate/up
      timeout 240 python3 bench/gemv_loads.py 2>&1 | tail -90 ;;
    s24c)  # next: what a kernel boundary costs in a CUDA graph's chain (bench/kernel_chain.py: 64 dependent kernels, 1 /
      # 132 / 528 programs, PDL on and off), the same steps in one launch with grid barriers, and a dependent atomic
      # round trip: the floor under the one-row GEMVs' ~4.5 us a call above their bytes, i.e. what fusing kernels can win
      timeout 120 python3 bench/kernel_chain.py 2>&1 | tail -14 ;;
    s24h)  # next: the w4a16 decode at batch 1 with its LM head at 4 bits (quantize_lm_head=True) against the default 8-bit
      # head, one process each (1B: 263 -> ~133 MB a step, predicted +5-7%; 8B: 525 -> ~266 MB, +3-4%). Quality (bench/quality.py,
      # pyllama): GPTQ +0.56% held-out perplexity with the 8-bit head, +1.47% with the 4-bit one (issue 13's bar: +3%)
      for m in 1b 8b; do
        DECODE_JSON=decode_24h_$m.json timeout 280 python3 bench/decode.py --models $m --batches 1 --quantize w4a16 \
          --no-compile-peer --ab-config quantize_lm_head=True 2>&1 | grep "interleaved\|Error\|error" | tail -3
      done ;;
    s24n)  # next: Nsight Compute on the 8B gate/up at one row, int4 (IDOT tiles among skinny's configs) and int8: is IDOT's
      # 1.9 TB/s (30.8 us cold in the w4a16 plan) bound by issue slots, by load latency (stalls on the scoreboard) or
      # by too few loads in flight (occupancy)? The full report goes to $OUT/ncu_24n.txt
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout 300 "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 bench/gemv_ncu.py --shape 8b --bits 4 8 > "$OUT/ncu_24n.txt" 2>&1
      grep -E "^int[48] |Duration|DRAM Throughput|Compute \(SM\) Throughput|Issued Warp Per Scheduler|No Eligible|Achieved \
Occupancy|Warp Cycles Per Issued|Registers Per" "$OUT/ncu_24n.txt" | head -150 ;;
    s26a)  # session 26, one call (~400 s) for a scarce machine: the generator's GPU tests of sessions 23-26 (Phi-3 LongRoPE,
      # SmolLM3 NoPE, Gemma / Gemma 2 / Gemma 3 with its q / k norms in the rope_kv call and the window mask advanced by
      # the greedy kernel), the GPTQ act-order tests, the rope_kv / decode-attention / softcap kernel tests; then what a
      # kernel boundary costs (s24c)
      timeout 240 python3 -m pytest -q -rf -m gpu tests/llm/test_generator.py -k "Phi3 or SmolLM3 or Gemma" 2>&1 | tail -4
      timeout 120 python3 -m pytest -q -rf -m gpu tests/models/test_gptq.py tests/codegen/test_rope_kv.py \
        tests/codegen/test_decode_attention_rope.py 2>&1 | tail -3
      timeout 120 python3 -m pytest -q -rf -m gpu tests/codegen/test_attention.py tests/codegen/test_decode_attention.py -k softcap 2>&1 | tail -3
      bash "$0" s24c 2>&1 | grep -v "^bytecode\|^NVIDIA" ;;
    s26b)  # session 26's second call: the 1B at batch 1 / 16 in bf16 against static KV + torch.compile reduce-overhead
      # (session 24's launches fewer outside the layers: 84 kernels a step predicted, was 89), then the 1B w4a16 with its
      # LM head at 4 bits against the 8-bit default (s24h's 1B half: +5-7% predicted)
      DECODE_JSON=decode_26b.json timeout 200 python3 bench/decode.py --models 1b 2>&1 | grep -i "error" | tail -4
      python3 bench/decode_summary.py "$OUT/decode_26b.json"
      DECODE_JSON=decode_26b_head4.json timeout 280 python3 bench/decode.py --models 1b --batches 1 --quantize w4a16 \
        --no-compile-peer --ab-config quantize_lm_head=True 2>&1 | grep "interleaved\|Error\|error" | tail -3 ;;
    s28a)  # next: the two GPU tests session 27 saw fail on an H100: Phi-3's LongRoPE generation (the test now takes
      # transformers' full forward as the reference at a divergence: kiln's tokens diverged from transformers 5.17's
      # generate exactly where each row passes the original length, with every attention choice and the reference
      # backend alike), and the 8-bit per-channel GPTQ prefill (kiln 0.0156 against the bound 0.0112, 1.5x the eager
      # bf16 model's error; the CPU's reference backend in bf16: 1.49x); full tracebacks to $OUT/s28a.log
      timeout 150 python3 -m pytest -q -rf -m gpu tests/llm/test_generator.py -k "Phi3" --tb=short -p no:logging \
        2>&1 | tee "$OUT/s28a.log" | grep -E "^E |passed|failed" | head -20
      timeout 120 python3 -m pytest -q -rf -m gpu tests/models/test_gptq.py -k "gpu_bf16_gptq" --tb=short -p no:logging \
        2>&1 | tee -a "$OUT/s28a.log" | grep -E "passed|failed" | tail -3 ;;
    s28b)  # session 28: the breadth models' decode at batch 1 / 16 against static KV + torch.compile reduce-overhead, one
      # process a model: Gemma-2-2B (soft-capped scores, sliding layers' window mask, 256k vocabulary, head dim 256) and
      # Qwen3-1.7B (q / k norms in the rope-decode attention); s25g's / s22q's bench halves, one model each
      for m in gemma2-2b qwen3-1.7b; do
        DECODE_JSON=decode_$m.json timeout 280 python3 bench/decode.py --models $m 2>&1 | grep -i "error" | tail -4
        python3 bench/decode_summary.py "$OUT/decode_$m.json"
      done ;;
    s29a)  # next: s28c's second half (cut off at 51% when session 28's budget ran out; its 78 tests before passed) and
      # the w4a16 plan that failed in session 28 (a 64-wide Llama's WORDS tile, fixed on the CPU)
      timeout 540 python3 -m pytest -q -rf -m gpu --tb=short -p no:logging tests/runtime/test_kernel_plan_quant.py \
        tests/codegen/test_attention_kv.py tests/codegen/test_gemm.py tests/codegen/test_epilogue.py \
        tests/codegen/test_epilogue_codes.py tests/codegen/test_act_codes.py tests/codegen/test_qgemm.py \
        tests/codegen/test_pointwise.py tests/codegen/test_tuning.py tests/codegen/test_greedy.py \
        2>&1 | tee "$OUT/s29a.log" | grep -E "^FAILED|^ERROR|passed|failed" | head -40 ;;
    s29b)  # session 29: PixArt-α 1024 with its step graph in fp8 (never measured): kiln bf16, kiln fp8, diffusers + torch.compile
      # and eager, one process; PSNR of fp8 against kiln bf16 (issue 14's bar 25 dB) and diffusers bf16 (issue 15's 30 dB)
      timeout ${PIXART_TIMEOUT:-500} python3 bench/diffusion.py --models pixart1024 --repeat 3 --quantize fp8 \
        --out "$OUT/diffusion_pixart1024_fp8.json" 2>&1 | grep -v "kept in float32" | tee "$OUT/s29b.log" | tail -12 ;;
    s29d)  # session 29: the 4-bit WORDS / IDOT peel on by default (pdl.WORDS_PEEL_MIN_BITS 4): the GPU tests of the WORDS,
      # IDOT and NORM_POST tiles and of PDL, then the 1B w4a16 at batch 1 against the old default (8: int8 only), one process
      timeout 400 python3 -m pytest -q -rf -m gpu tests/codegen/test_pdl.py tests/codegen/test_skinny_idot.py \
        tests/codegen/test_skinny_norm_post.py 2>&1 | tail -3
      ab_decode 29d kernels.pdl.WORDS_PEEL_MIN_BITS=8 1b:w4a16 ;;
    s30a)  # next: does the tuner pick a decode step's kernels as the whole step would? (bench/decode_refine.py: each decision's
      # near-tie alternatives, within 25% alone, built into the 1B's decode plan and the step replays timed interleaved;
      # the gains taken together and tok/s compared), the 1B w4a16 and bf16 (QUANTS) at batch 1, one process each
      for q in ${QUANTS:-w4a16 bf16}; do
        timeout 270 python3 bench/decode_refine.py --models 1b $([ $q = bf16 ] || echo --quantize $q) 2>&1 | grep -v "^ *{" | tail -14
      done ;;
    s30b)  # next: WHOLE_K_WORDS (16-row WORDS / IDOT tiles over a whole K step, unsplit: the peel reads a 1B qkv / o
      # program's whole weight slice before its wait): its GPU tests, then the 1B w4a16 (QUANTS="w4a16 w8a16": both, in
      # a call of its own: ~600 s) refined with those candidates offered (measured alone by the tuner and in the step)
      timeout 150 python3 -m pytest -q -rf -m gpu tests/codegen/test_skinny_whole_k.py 2>&1 | tail -2
      for q in ${QUANTS:-w4a16}; do
        timeout 220 python3 bench/decode_refine.py --models 1b --quantize $q --set kernels.skinny.WHOLE_K_WORDS=1 2>&1 \
          | grep -v "^ *{" | tail -14
      done ;;
    s30c)  # next: KILN_REFINE (runtime/refine.py: a plan's decode GEMM decisions made again in the step, each near-tie
      # candidate swapped into its calls, the step captured and timed whole; on by default since): its GPU test, then the
      # 1B w4a16 at batch 1 with it against the same generator with KILN_REFINE=0 (the variant), one process (interleaved
      # tok/s; QUANT=bf16 for the bf16 step). Run in session 30 (bf16) as the variant KILN_REFINE=1, before the default
      # changed
      timeout 150 python3 -m pytest -q -rf -m gpu tests/runtime/test_refine.py 2>&1 | tail -2
      q=${QUANT:-w4a16}
      DECODE_JSON=decode_30c_$q.json timeout 300 python3 bench/decode.py --models 1b --batches 1 \
        $([ $q = bf16 ] || echo --quantize $q) --no-compile-peer --ab-env "KILN_REFINE=0" 2>&1 | grep "interleaved\|Error\|error" | tail -4
      python3 bench/tuning_dump.py "$KILN_CACHE_DIR" --refined | tail -30 ;;
    s30d)  # session 30: after s30a-c (H100): the 1B quantized at batch 1 against the default, one process each: WHOLE_K_WORDS
      # alone, with KILN_REFINE, KILN_REFINE alone (w4a16), both (w8a16). (Both are defaults since: the variants now
      # measure nothing new; s30e compares the new defaults with the old)
      ab() { local tag=$1 q=$2; shift 2; echo "-- $tag $q $*"
        DECODE_JSON=decode_30d_$tag.json timeout 200 python3 bench/decode.py --models 1b --batches 1 --quantize $q \
          --no-compile-peer "$@" 2>&1 | grep "interleaved\|Error\|error" | tail -3; }
      ab wk w4a16 --ab-set kernels.skinny.WHOLE_K_WORDS=1
      ab wkref w4a16 --ab-set kernels.skinny.WHOLE_K_WORDS=1 --ab-env KILN_REFINE=1
      ab ref w4a16 --ab-env KILN_REFINE=1
      ab wkref8 w8a16 --ab-set kernels.skinny.WHOLE_K_WORDS=1 --ab-env KILN_REFINE=1 ;;
    s30e)  # session 30: the new defaults (skinny.WHOLE_K_WORDS on, KILN_REFINE on a GPU) against the old (variant), the 1B at
      # batch 1, one process each; the GPU tests of the configurations and of the refinement
      timeout 200 python3 -m pytest -q -rf -m gpu tests/codegen/test_skinny_whole_k.py tests/runtime/test_refine.py \
        tests/codegen/test_skinny.py -k "whole_k or refine or every_config" 2>&1 | tail -3
      for q in bf16 w4a16; do
        DECODE_JSON=decode_30e_$q.json timeout 200 python3 bench/decode.py --models 1b --batches 1 \
          $([ $q = bf16 ] || echo --quantize $q) --no-compile-peer --ab-set kernels.skinny.WHOLE_K_WORDS=0 \
          --ab-env KILN_REFINE=0 2>&1 | grep "interleaved\|Error\|error" | tail -3
      done ;;
    s43a)  # session 43 (~400 s): the TMA template's GLU as one product of both halves a K step and its rope's one-product
      # form (ROPE_ONE, w read through a [2, N / D, D / 2, K] view): their GPU tests at model shapes (every config), then
      # the 1B prefill: bf16, fp8 / w8a8 with the rope pass and without (the tuner's candidate times in fp8_43.json)
      timeout -s INT 150 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_rope_cols.py \
        tests/codegen/test_tma_gemm.py -k "1b_qkv or every_config_at_model" 2>&1 | tee "$OUT/s43a_tests.log" \
        | grep -v "Warning\|warn" | tail -12
      timeout 240 python3 bench/fp8.py --parts llm --modes bf16,w8a8,w8a8-rope0,fp8,fp8-rope0 --out "$OUT/fp8_43.json" 2>&1 \
        | tail -16 ;;
    s43d)  # session 43, on the last minutes of a budget (~140 s): the 1B prefill in bf16 / fp8 / w8a8, nothing else
      timeout 140 python3 bench/fp8.py --parts llm --modes bf16,fp8,w8a8 --out "$OUT/fp8_43.json" 2>&1 | tail -16 ;;
    s48a)  # the next session's first run (~550 s): on an H200 issue 13's / 14's goal figures (s47a: the 1B prefill, then
      # the 1B decode); on an H100 half of the GPU suite in 4 pytest-xdist processes (PART=1/2: 201 tests in 328 s, session
      # 50), then PART=2/2 in the next run (200 in 468 s)
      if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
        bash "$0" s47a 2>&1 | grep -v "^NVIDIA\|^bytecode"
      else
        GPU_WORKERS=${GPU_WORKERS:-4} PART=${PART:-1/2} TESTS_TIMEOUT=${TESTS_TIMEOUT:-520} bash "$0" gpupart 2>&1 \
          | grep -v "^NVIDIA\|^bytecode"
      fi ;;
    s47b)  # session 47, after s47a on an H200 (~450 s): issue 15's DiT-XL/2 goal figures there (one and eight images against
      # diffusers eager and torch.compile default / reduce-overhead, one process; last measured on an H200 in session 11)
      DIT_TIMEOUT=540 bash "$0" diffusion_dit 2>&1 | grep -v "^NVIDIA\|Warning\|warn\|^{'model'" | tail -16 ;;
    s47d)  # session 47 (~200 s): warm GEMM decisions made again in the step (KILN_REFINE=all, runtime/refine.py): its GPU
      # tests, then the DiT one-image step with and without (bench/dit_step.py --ab refine: replay, kernels, timeline)
      timeout -s INT 100 python3 -m pytest -q -rf --tb=short -m gpu tests/runtime/test_refine.py 2>&1 \
        | tee "$OUT/s47d_tests.log" | grep -v "Warning\|warn" | tail -6
      (cd bench && timeout 240 python3 dit_step.py --images 1 --ab refine 2>&1 | grep -v "Warning\|addmm\|_warn_once\|float32" \
        | tail -30) ;;
    s47c)  # session 47 (~450 s): on an H200 the 8B's goal figures (s32b: w4a16 with its 4-bit head against the default, w8a16)
      bash "$0" s32b 2>&1 | grep -v "^NVIDIA" ;;
    s47a)  # for session 47 (~500 s): on an H200 issue 13's / 14's goal figures: the 1B prefill (s44b), then the 1B decode
      # at batch 1 in bf16 / w4a16 / w8a16 (s32a); on an H100 PixArt-alpha 512 and 1024 with and without cuBLASLt's other
      # algorithms (codegen/blaslt.py: 2048-8192-row GEMMs 0-7% faster alone, session 46) against torch.compile default
      # and reduce-overhead (512 px stood at 1.96x / 1.55x without them)
      if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
        bash "$0" s44b s32a 2>&1 | grep -v "^NVIDIA\|^bytecode"
      else
        timeout 540 python3 bench/diffusion.py --models pixart,pixart1024 --repeat 3 --ab-blaslt \
          --out "$OUT/diffusion_47a.json" 2>&1 | grep -v "Warning\|warn\|float32\|^{'model'" | tail -14
      fi ;;
    s46c)  # session 46 (~330 s): cuBLASLt's algorithms as GEMM candidates (codegen/blaslt.py, nvmath-python from .whl): their
      # GPU tests (every algorithm against float64, in a CUDA graph; a DiT plan forced to them), then the DiT one-image
      # step with and without them (bench/dit_step.py --ab blaslt: replay, kernels, timeline by role)
      timeout -s INT 150 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_blaslt.py tests/runtime/test_kernel_plan.py \
        -k "blaslt or every_gemm_choice" 2>&1 | tee "$OUT/s46c_tests.log" | grep -v "Warning\|warn" | tail -8
      (cd bench && timeout 200 python3 dit_step.py --images 1 --ab blaslt 2>&1 | grep -v "Warning\|addmm\|_warn_once\|float32" \
        | tail -30) ;;
    s46d)  # session 46 (~450 s): the DiT-XL/2 pipeline (1 and 8 images) with and without cuBLASLt's other algorithms, one
      # process (diffusers eager beside, no torch.compile peer), then the 1B prefill in bf16 / w8a8 / fp8 (s44b: the bf16
      # arm's GEMMs may now take them)
      timeout 300 python3 bench/diffusion.py --models dit --compile-modes '' --ab-blaslt --out "$OUT/diffusion_46d.json" 2>&1 \
        | grep -v "^{'model'.*step_plan\|Warning\|warn" | tail -12
      bash "$0" s44b 2>&1 | grep -v "^NVIDIA" ;;
    s46b)  # session 46 (~500 s): cuBLASLt's other algorithms at DiT / PixArt shapes (bench/blaslt_algos.py, nvmath-python from
      # .whl), then on an H200 the 1B prefill (s44b), then PixArt-alpha 512 against torch.compile default and reduce-overhead
      timeout 200 python3 bench/blaslt_algos.py --only dit512,dit4096,pixart8192 --limit 24 --out "$OUT/blaslt.json" 2>&1 \
        | grep -v "Warning\|warn" | tail -16
      if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then bash "$0" s44b 2>&1 | grep -v "^NVIDIA"; fi
      left=$((560 - SECONDS))
      if [ $left -ge 90 ]; then PIXART_TIMEOUT=$left bash "$0" diffusion_pixart 2>&1 | grep -v "^NVIDIA"; fi ;;
    s46a)  # for session 46 (~450 s): the 1B prefill (s44b: on an H200 issue 14's figures), then PixArt-alpha 512 against
      # torch.compile default AND reduce-overhead (never its peer before), its compile time after session 45's import change
      bash "$0" s44b 2>&1 | grep -v "^NVIDIA"
      PIXART_TIMEOUT=300 bash "$0" diffusion_pixart 2>&1 | grep -v "^NVIDIA" ;;
    s45e)  # session 45, the last minutes (~170 s): the DiT pipeline at one image against diffusers with the transformer
      # under torch.compile reduce-overhead (CUDA graphs: the fair peer of kiln's replays; the pipelines' peers ran in
      # default mode until now)
      timeout 170 python3 bench/diffusion.py --models dit --batches 1 --repeat 3 --compile-modes reduce-overhead \
        --out "$OUT/diffusion_45e.json" 2>&1 | grep -v "^{'model'.*step_plan\|Warning\|warn" | tail -8 ;;
    s45d)  # session 45 (~380 s): the GPU tests of what sessions 40-45 changed that s45a's cut run did not reach (GEMM configs
      # within 128 accumulator registers, rope, the plans, pipelines, generator, README), failures and durations listed
      timeout -s INT ${TESTS_TIMEOUT:-370} python3 -m pytest -q -rf --tb=line -p no:logging -m gpu tests/codegen/test_gemm.py \
        tests/codegen/test_epilogue_codes.py tests/codegen/test_qgemm.py tests/codegen/test_rope_cols.py tests/codegen/test_rope_kv.py \
        tests/codegen/test_tuning.py tests/runtime tests/diffusion tests/llm tests/test_readme.py --durations=15 2>&1 \
        | tee "$OUT/s45d.log" | grep -v "Warning\|warn" | tail -40 ;;
    s45b)  # session 45 (~560 s): on an H200 the 1B prefill first (issue 14's device; s44b), then the DiT-XL/2 pipeline at 1 and
      # 8 images (s37b) and PixArt-alpha 1024 against torch.compile with what time is left
      if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then bash "$0" s44b 2>&1 | grep -v "^NVIDIA"; fi
      bash "$0" s37b 2>&1 | grep -v "^NVIDIA"
      left=$((560 - SECONDS))
      if [ $left -ge 60 ]; then PIXART_TIMEOUT=$left bash "$0" diffusion_pixart1024 2>&1 | grep -v "^NVIDIA"; fi ;;
    s45a)  # session 45 (~540 s): the TMA attention's GPU tests without PAD_QK (every config in every form offered), then
      # every GPU test of the repository (not run whole since session 29), the 25 slowest listed; SIGINT at the limit
      timeout -s INT 60 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_attention_tma.py 2>&1 \
        | tee "$OUT/s45a_attn.log" | grep -v "Warning\|warn" | tail -6
      timeout -s INT ${TESTS_TIMEOUT:-450} python3 -m pytest -q -rf --tb=line -p no:logging -m gpu tests \
        --deselect tests/codegen/test_attention_tma.py --durations=25 2>&1 | tee "$OUT/s45a_gpu.log" \
        | grep -v "Warning\|warn" | tail -45 ;;
    s44c)  # session 44 (~250 s): the TMA attention's window boxes from the main box's end (TMA zero-filling the lanes past
      # head dim 72) and its loop forms (AHEAD, PAD_QK) checked on the GPU (every config in every form: DiT / PixArt / Llama
      # shapes, PixArt's padding masks), then timed at DiT's 8 images, PixArt 1024 and the 1B prefill against SDPA
      timeout -s INT 140 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_attention_tma.py 2>&1 \
        | tee "$OUT/s44c_tests.log" | grep -v "Warning\|warn" | tail -8
      timeout 100 python3 bench/attn.py --quick --tma --only "8 images,1024,llama" 2>&1 | tail -30 ;;
    s44b)  # session 44, after s44a (~140 s): the 1B prefill in bf16 / w8a8 / fp8 with the paired GLU tile 128 x 64
      timeout 170 python3 bench/fp8.py --parts llm --modes bf16,w8a8,fp8 --out "$OUT/fp8_44b.json" 2>&1 | tail -16 ;;
    s44a)  # session 44 (~290 s): s43c with the DiT in bf16 / fp8 (e4m3's paired tiles at K = 1152) between the prefill and
      # the GPU tests
      timeout 160 python3 bench/fp8.py --parts llm --modes bf16,w8a8,fp8 --out "$OUT/fp8_44.json" 2>&1 | tail -16
      timeout 70 python3 bench/fp8.py --parts dit --modes bf16,fp8 --out "$OUT/fp8_44_dit.json" 2>&1 | tail -10
      timeout -s INT 60 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_rope_cols.py \
        tests/codegen/test_tma_gemm.py -k "1b_qkv or (every_config_at_model and 16384)" 2>&1 | tee "$OUT/s44a_tests.log" \
        | grep -v "Warning\|warn" | tail -8 ;;
    s43c)  # session 43, the shortest (~220 s): the 1B prefill in bf16 / w8a8 / fp8 first (the tuner checks each candidate's
      # output against the first's), then as many of s43b's GPU tests as fit in 60 s
      timeout 160 python3 bench/fp8.py --parts llm --modes bf16,w8a8,fp8 --out "$OUT/fp8_43.json" 2>&1 | tail -16
      timeout -s INT 60 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_rope_cols.py \
        tests/codegen/test_tma_gemm.py -k "1b_qkv or (every_config_at_model and 16384)" 2>&1 | tee "$OUT/s43c_tests.log" \
        | grep -v "Warning\|warn" | tail -8 ;;
    s43b)  # session 43, s43a cut to a short budget (~260 s): the GPU tests at the GLU gate/up and down shapes (and the
      # GLU's block-scale case), then the 1B prefill in bf16 / w8a8 / fp8 only
      timeout -s INT 110 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_rope_cols.py \
        tests/codegen/test_tma_gemm.py -k "1b_qkv or (every_config_at_model and (16384 or 8192))" 2>&1 | tee "$OUT/s43b_tests.log" \
        | grep -v "Warning\|warn" | tail -12
      timeout 170 python3 bench/fp8.py --parts llm --modes bf16,w8a8,fp8 --out "$OUT/fp8_43.json" 2>&1 | tail -16 ;;
    s42b)  # session 42 (~330 s): RoPE in the QKV AQGEMM's epilogue (passes/fuse_rope_epilogue.py): its GPU test at the
      # 1B QKV shape (every TMA config holding whole heads), then the 1B prefill: bf16, fp8 / w8a8 with it and without
      timeout -s INT 90 python3 -m pytest -q -rf --tb=short -m gpu tests/codegen/test_rope_cols.py 2>&1 \
        | tee "$OUT/s42b_tests.log" | grep -v "Warning\|warn" | tail -12
      timeout 230 python3 bench/fp8.py --parts llm --modes bf16,w8a8,w8a8-rope0,fp8,fp8-rope0 --out "$OUT/fp8_42.json" 2>&1 \
        | tail -16 ;;
    s42a)  # session 42 (~200 s): the block GPU tests again (session 41: two failures at the GLU gate/up shape, their
      # assertion text cut off; each failure now says which check and by how much); SIGINT at the limit, so pytest still
      # prints what failed
      timeout -s INT 200 python3 -m pytest -q -rf --tb=line -m gpu tests/codegen/test_tma_gemm.py \
        tests/runtime/test_kernel_plan_blocks.py -k block 2>&1 | tee "$OUT/s42a.log" | grep -v "Warning\|warn" | tail -12 ;;
    s40a)  # session 40 (~330 s): s39a cut down: bench/block_codes.py's 1B pair (the consumer in cuBLASLt's 1 x 128 block
      # recipe too: lower.scaled_mm_blocks), the 1B prefill in bf16 / fp8 / fp8-blocks / w8a8, the block GPU tests
      timeout 100 python3 bench/block_codes.py --pairs 1b 2>&1 | tail -14
      timeout 170 python3 bench/fp8.py --parts llm --modes bf16,fp8,fp8-blocks,w8a8 --out "$OUT/fp8_40.json" 2>&1 | tail -12
      timeout 150 python3 -m pytest -q -rf -m gpu tests/codegen/test_tma_gemm.py tests/runtime/test_kernel_plan_blocks.py \
        -k block 2>&1 | tail -4 ;;
    s40h)  # session 40, on an H200 (~420 s): issue 13's 1B goal figures (s32a) and PixArt-alpha 512 against torch.compile
      bash "$0" s32a diffusion_pixart 2>&1 | grep -v "^bytecode\|^NVIDIA" ;;
    s39b)  # session 39, s39a cut to a short budget (~280 s): the 1B prefill with and without the block codes, then the
      # 1B pair alone in bench/block_codes.py
      timeout 190 python3 bench/fp8.py --parts llm --modes bf16,fp8,fp8-blocks,w8a8,w8a8-blocks --out "$OUT/fp8_39.json" \
        2>&1 | tail -14
      timeout 90 python3 bench/block_codes.py --pairs 1b 2>&1 | tail -6 ;;
    s39a)  # session 39 (~400 s): block-scaled codes between two quantized GEMMs (the codes=(fmt, 128) epilogue and
      # xs_group=128 K steps of tma_gemm / aqgemm): bench/block_codes.py (the 1B prefill's gate/up -> down and DiT's fc1
      # -> fc2 at 4096 rows, fp8 and int8, against the row-scaled path; the consumer in cuBLASLt's 1 x 128 block recipe
      # too), the 1B prefill in fp8 / w8a8 with and without CompileConfig.quantize_act_blocks, then the GPU tests of the
      # block kernels at model shapes (every config), of a DiT plan with them and of lower.scaled_mm_blocks
      timeout 150 python3 bench/block_codes.py --pairs "1b,b16" 2>&1 | tail -30
      timeout 250 python3 bench/fp8.py --parts llm --modes bf16,fp8,fp8-blocks,w8a8,w8a8-blocks \
        --out "$OUT/fp8_39.json" 2>&1 | tail -14
      timeout 240 python3 -m pytest -q -rf -m gpu tests/codegen/test_tma_gemm.py tests/runtime/test_kernel_plan_blocks.py \
        -k block 2>&1 | tail -4 ;;
    s38a)  # session 38 (~200 s): the TMA-fed attention's GPU tests with a padding mask (PixArt's cross-attention, bool and
      # bias, every config) and the rest of its tests, then bench/attn.py --quick (its new rows: the cross-attention with 24
      # of 120 tokens attended; the Llama-1B prefill's causal GQA, the TMA kernel's query tiles heaviest first or in order)
      timeout 200 python3 -m pytest -q -rf -m gpu tests/codegen/test_attention_tma.py 2>&1 | tail -4
      timeout 120 python3 -m pytest -q -rf -m gpu tests/runtime/test_kernel_plan.py -k pixart 2>&1 | tail -4  # (after run 1)
      timeout 240 python3 bench/attn.py --quick 2>&1 | tail -50 ;;
    s38b)  # session 38 (~90 s on a warm machine): the DiT-XL/2 step at 8 images (CFG batch 16) with and without the TMA-fed
      # attention offered: the step's replay, kernels and timeline by role (bench/dit_step.py)
      (cd bench && timeout 330 python3 dit_step.py --images 8 2>&1 | grep -v "Warning\|addmm\|_warn_once\|float32" | tail -30) ;;
    s37a)  # session 37 (~330 s): the attention kernel's GPU tests (SPLIT_V: p v as 64 lanes + a window of v's last 16 at head
      # dim 72, every config, against float32) and of the TMA-fed kernel (attention_tma.py), then bench/attn.py --quick:
      # the template (SPLIT_V off / on), the TMA kernel and SDPA at DiT / PixArt shapes
      timeout 240 python3 -m pytest -q -rf -m gpu tests/codegen/test_attention.py tests/codegen/test_attention_tma.py \
        tests/runtime/test_kernel_plan.py -k "attention or tma" 2>&1 | tail -8
      timeout 240 python3 bench/attn.py --quick 2>&1 | tail -60 ;;
    s37b)  # session 37 (~250 s): the DiT-XL/2 pipeline (1 and 8 images) as it is (the TMA-fed attention offered) and without
      # it, one process, diffusers eager beside (no torch.compile peer)
      timeout 400 python3 bench/diffusion.py --models dit --compile-modes '' --ab-tma 0 --out "$OUT/diffusion_37b.json" 2>&1 \
        | grep -v "^{'model'.*step_plan" | tail -12 ;;
    s36g)  # session 36 (~150 s): the GPU tests of the refinement (one winner a pass) and of the generator (COPY_ASIDE on)
      timeout 280 python3 -m pytest -q -rf -m gpu tests/runtime/test_refine.py tests/llm/test_generator.py 2>&1 | tail -4 ;;
    s36f)  # session 36 (~250 s): where a first run's time goes (bench/decode.py's build_phases: each plan's phases), the 1B
      # w4a16 at batch 1 and the 1B bf16 at batch 16 (its refinement at 16 rows), each from an empty cache
      for c in 1:w4a16 16:bf16; do
        IFS=: read -r b q <<< "$c"
        KILN_CACHE_DIR=/tmp/kiln-cache-36g$b DECODE_JSON=decode_36f_$b$q.json timeout 240 python3 bench/decode.py --models 1b \
          --batches $b $([ $q = bf16 ] || echo --quantize $q) --no-compile-peer 2>&1 | grep "Error\|error\|timeline:\|refine:" \
          | cut -c1-400 | tail -4
        python3 -c "import json; d = json.load(open('$OUT/decode_36f_$b$q.json')); k = d['1b']['bs$b']['kiln']
print('compile_s', d['1b']['compile_s'], {x: k[x] for x in ('decode_tok_s', 'first_run_s')})
for b, p in k['build_phases'].items(): print('   ', b, p)"
      done ;;
    s36e)  # session 36 (~150 s): the refinement's replays a round by the step's length (refine.reps_for: the 8B's ~7, not
      # 30): the 8B w4a16 from an empty cache against s36c's (first run 55.7 s, refinement 18.8 s, noise 0.6 us, 488 tok/s)
      KILN_CACHE_DIR=/tmp/kiln-cache-36f DECODE_JSON=decode_36e_8b.json timeout 300 python3 bench/decode.py --models 8b \
        --batches 1 --quantize w4a16 --no-compile-peer 2>&1 | grep "Error\|error\|timeline:\|refine:" | cut -c1-400 | tail -4
      python3 -c "import json; d = json.load(open('$OUT/decode_36e_8b.json'))['8b']['bs1']['kiln']; r = d['refine'] or {}
print({k: d[k] for k in ('decode_tok_s', 'first_run_s')}, {k: r.get(k) for k in ('seconds', 'reps', 'noise_ms')})" ;;
    s36d)  # session 36 (~350 s): the other modes' figures with s36c's refinement (one winner a pass) and COPY_ASIDE on, each
      # from an empty cache, a process each: the 1B bf16 and w8a16, the 8B w8a16 at batch 1 (s31a's lines, with the passes)
      CASES="${CASES:-1b:bf16 1b:w8a16 8b:w8a16}" AB_TIMEOUT=200 bash "$0" s31a 2>&1 | grep -v "^bytecode\|^NVIDIA\|^===" ;;
    s36c)  # session 36 (~450 s): KILN_REFINE one winner a pass, the rest timed again around it (refine.PASSES; s36a: the
      # winners taken together lost where neighbours interact): s36a's two processes of fresh caches (MAX_ALTS 3 against
      # 6: four tunings of the 1B w4a16), each arm's passes; then the 8B w4a16 from an empty cache (its first run's time)
      for i in 1 2; do
        KILN_CACHE_DIR=/tmp/kiln-cache-36c$i DECODE_JSON=decode_36c_$i.json timeout 240 python3 bench/decode.py --models 1b \
          --batches 1 --quantize w4a16 --no-compile-peer --ab-set runtime.refine.MAX_ALTS=6 \
          --ab-config "cache_dir='/tmp/kiln-cache-36d$i'" 2>&1 | grep "interleaved\|Error\|error\|timeline:\|refine:" | tail -5
      done
      KILN_CACHE_DIR=/tmp/kiln-cache-36e DECODE_JSON=decode_36c_8b.json timeout 300 python3 bench/decode.py --models 8b \
        --batches 1 --quantize w4a16 --no-compile-peer 2>&1 | grep "kiln {\|Error\|error\|timeline:\|refine:" | cut -c1-400 | tail -4 ;;
    s36a)  # next (~300 s): KILN_REFINE's cut (MAX_ALTS = 3 alternatives within 25% alone, fastest first, and the choice's
      # NORM_POST twin: refine.TWINS) against 6, the 1B w4a16 at batch 1 (session 35: its gate/up's NORM_POST twin and its
      # down's 8-split tile missed in some processes, 1,868-1,963 tok/s): each arm tunes from its own empty cache (a
      # refinement is cached by decision), twice; then each cache's refined decisions (each alternative's step delta)
      for i in 1 2; do
        KILN_CACHE_DIR=/tmp/kiln-cache-36a$i DECODE_JSON=decode_36a_$i.json timeout 240 python3 bench/decode.py --models 1b \
          --batches 1 --quantize w4a16 --no-compile-peer --ab-set runtime.refine.MAX_ALTS=6 \
          --ab-config "cache_dir='/tmp/kiln-cache-36b$i'" 2>&1 | grep "interleaved\|Error\|error\|timeline:" | tail -3
      done
      for c in /tmp/kiln-cache-36a1 /tmp/kiln-cache-36b1 /tmp/kiln-cache-36a2 /tmp/kiln-cache-36b2; do
        echo "== $c"; python3 bench/tuning_dump.py $c --refined 2>&1 | cut -c1-200
      done ;;
    s36b)  # next (~200 s): llm.generator.COPY_ASIDE (each step's tokens copied to the host on a side stream, off the next
      # replay's path): its GPU test, then the 1B w4a16 and bf16 at batch 1 against it on (--ab-set), between_steps_us's
      # "fused" against "aside" (the step's stream's share of the greedy kernel and the copy)
      timeout 60 python3 -m pytest -q -rf -m gpu tests/llm/test_generator.py -k aside 2>&1 | tail -2
      for q in ${QUANTS:-w4a16 bf16}; do
        DECODE_JSON=decode_36b_$q.json timeout 200 python3 bench/decode.py --models 1b --batches 1 \
          $([ $q = bf16 ] || echo --quantize $q) --no-compile-peer --ab-set llm.generator.COPY_ASIDE=1 2>&1 \
          | grep "interleaved\|Error\|error" | tail -3
        python3 -c "import json; d = json.load(open('$OUT/decode_36b_$q.json'))['1b']['bs1']; print('$q', d['kiln']['between_steps_us'])"
      done ;;
    s35d)  # session 35 (run 5, 151 s; history: the four-step form was never chosen and taken out) WIDE_WHOLE_K's
      # four-step form (the 1B's down, K 8192, one step on 32 warps): the whole-K GPU tests, then the 1B w4a16 at batch 1 against WIDE_WHOLE_K off (at the 1B only the down has a wide tile)
      timeout 60 python3 -m pytest -q -rf -m gpu tests/codegen/test_skinny_whole_k.py -k "down" 2>&1 | tail -2
      DECODE_JSON=decode_35d_1bw4a16.json timeout 150 python3 bench/decode.py --models 1b --batches 1 --quantize w4a16 \
        --no-compile-peer --ab-set kernels.skinny.WIDE_WHOLE_K=0 2>&1 | grep "interleaved\|Error\|error\|timeline:" | tail -3 ;;
    s35c)  # session 35 (~450 s): skinny.WIDE_WHOLE_K (the whole-K WORDS tile over one step of K 4096 on 16 warps: the 8B's
      # qkv / o / gate/up): its GPU tests, then the 8B w4a16 and w8a16 at batch 1 against it off (--ab-set), the 8B gate/up's
      # candidates alone
      timeout 150 python3 -m pytest -q -rf -m gpu tests/codegen/test_skinny_whole_k.py 2>&1 | tail -2
      for q in ${QUANTS:-w4a16 w8a16}; do
        DECODE_JSON=decode_35c_8b$q.json timeout 240 python3 bench/decode.py --models 8b --batches 1 --quantize $q \
          --no-compile-peer --ab-set kernels.skinny.WIDE_WHOLE_K=0 2>&1 | grep "interleaved\|Error\|error\|timeline:" | tail -3
      done
      python3 bench/tuning_dump.py "$KILN_CACHE_DIR" --rows 28672 --top 6 2>&1 | grep -A6 "x \[1, 1, 4096\]" | head -24
      python3 bench/tuning_dump.py "$KILN_CACHE_DIR" --refined 2>&1 | grep -A4 "28672" | head -20 ;;
    s35b)  # session 35 (run 3, 334 s; history: ONE_STEP_SPLITS was never chosen and taken out) skinny.ONE_STEP_SPLITS
      # (the whole-K WORDS tile split to one step a split where K spans several: the 1B's down, the 8B's qkv / o / gate/up / down): its GPU tests, then the 1B w4a16, the 8B w4a16 and the
      # 1B w8a16 at batch 1 against it off (--ab-set: the off arm decides again where the on arm took a split tile)
      timeout 200 python3 -m pytest -q -rf -m gpu tests/codegen/test_skinny_whole_k.py 2>&1 | tail -2
      for mq in ${CASES:-1b:w4a16 8b:w4a16 1b:w8a16}; do
        IFS=: read -r m q <<< "$mq"
        DECODE_JSON=decode_35b_$m$q.json timeout 240 python3 bench/decode.py --models $m --batches 1 --quantize $q \
          --no-compile-peer --ab-set kernels.skinny.ONE_STEP_SPLITS=0 2>&1 | grep "interleaved\|Error\|error\|timeline" | tail -3
      done
      python3 bench/tuning_dump.py "$KILN_CACHE_DIR" --top 8 2>&1 | grep -A8 "weight \[2048, 8192\] bits 4\|weight \[28672, 4096\] bits 4" | head -30 ;;
    s35a)  # session 35 (run 2, 421 s; history: KILN_L2_BRANCH was taken out after it, a loss at 8, 12 and 24 MB) the branch at
      # 8 / 12 MB against it off (1B w4a16), the 1B w8a16 and the 8B figures
      for mb in ${BRANCHES:-8 12}; do
        DECODE_JSON=decode_35a_l2$mb.json timeout 200 python3 bench/decode.py --models 1b --batches 1 --quantize w4a16 \
          --no-compile-peer --ab-env "KILN_L2_BRANCH=$mb" 2>&1 | grep "interleaved\|Error\|error\|variant timeline" | tail -3
      done
      CASES=1b:w8a16 AB_TIMEOUT=150 bash "$0" s31a 2>&1 | grep -v "^bytecode\|^NVIDIA\|^===="
      bash "$0" s32b 2>&1 | grep -v "^bytecode\|^NVIDIA\|^====" ;;
    s34a)  # session 34 (~400 s): a whole-K WORDS GEMV's one step without the K loop (qgemm.ONE_STEP: 48 registers, not
      # 128, ~20% fewer instructions after the wait), the one-row GEMV GPU tests, then the 1B at batch 1 in w4a16 and
      # w8a16, each against the switch off in one process (with timelines)
      timeout 240 python3 -m pytest -q -rf -m gpu tests/codegen/test_skinny.py tests/codegen/test_skinny_whole_k.py \
        tests/codegen/test_skinny_idot.py tests/codegen/test_skinny_norm_post.py 2>&1 | tail -3
      for q in ${QUANTS:-w4a16 w8a16}; do
        DECODE_JSON=decode_34a_$q.json timeout 200 python3 bench/decode.py --models 1b --batches 1 --quantize $q \
          --no-compile-peer --ab-set kernels.qgemm.ONE_STEP=0 2>&1 | grep "interleaved\|Error\|error\|timeline" | tail -5
      done ;;
    s33c)  # session 33 (~350 s): the decode attention's plan form in 1 / 2 / 8 warps alone (decode_attn, 1B), then this
      # tree's goal figures with timelines: the 8B w4a16 and the 1B bf16 at batch 1 (s31a's lines)
      timeout 120 python3 bench/decode_attn.py --shapes 1b 2>&1 | grep -v "^bytecode\|^NVIDIA" | tail -20
      CASES="${CASES:-8b:w4a16 1b:bf16}" AB_TIMEOUT=200 bash "$0" s31a 2>&1 | grep -v "^bytecode\|^NVIDIA\|^===" ;;
    s33a|s33b)  # session 33: fewer round trips after the PDL wait (the decode attention's loads; the last program's
      # split sum unrolled, a one-row GEMV's residual loaded after the wait) in this tree against the tree before (.old, made
      # by `mkdir .old && git archive a1fa7d4 | tar -x -C .old`, carried; its own package path and kiln cache). s33a (~400 s): the GPU tests, each
      # attention form alone (decode_attn, 1B), the 1B's batch-1 w4a16 decode, the two trees in turn (a process each, with
      # timelines). s33b (~450 s): the same for bf16, then the GEMV switches' A/B in one process (w4a16)
      if [ $stage = s33b ]; then
        QUANTS=${QUANTS:-bf16} SKIP_ATTN=1 bash "$0" s33a 2>&1 | grep -v "^bytecode\|^NVIDIA\|^==="
        DECODE_JSON=decode_33b_ab.json timeout 200 python3 bench/decode.py --models 1b --batches 1 --quantize w4a16 \
          --no-compile-peer --ab-set kernels.qgemm.SUM_UNROLL=0,kernels.qgemm.EARLY_RESIDUAL=0 2>&1 \
          | grep "interleaved\|Error\|error\|timeline" | tail -5
        continue
      fi
      [ -n "${SKIP_ATTN:-}" ] || timeout 240 python3 -m pytest -q -rf -m gpu tests/codegen/test_decode_attention.py tests/codegen/test_decode_attention_rope.py \
        tests/codegen/test_pdl.py tests/codegen/test_skinny.py 2>&1 | tail -3
      mkdir -p /tmp/kpkg_old && ln -sfn "$PWD/.old" /tmp/kpkg_old/kiln
      for t in $([ -n "${SKIP_ATTN:-}" ] || echo new old); do
        echo "--- decode_attn ($t)"
        (if [ $t = old ]; then cd .old; export PYTHONPATH=/tmp/kpkg_old:/tmp/site; fi
         timeout 150 python3 bench/decode_attn.py --shapes 1b 2>&1 | grep -v "^bytecode\|^NVIDIA" | tail -14)
      done
      for q in ${QUANTS:-w4a16}; do
        for t in new old; do
          (if [ $t = old ]; then cd .old; export PYTHONPATH=/tmp/kpkg_old:/tmp/site KILN_CACHE_DIR=/tmp/kiln-cache-old; fi
           DECODE_JSON=$OUT/decode_33a_${q}_$t.json timeout 200 python3 bench/decode.py --models 1b --batches 1 \
             $([ $q = bf16 ] || echo --quantize $q) --no-compile-peer 2>&1 | grep "kiln {\|Error\|error\|timeline" | tail -3 \
             | python3 -c "import sys, json
for l in sys.stdin:
    if ' kiln {' not in l: print('$q $t', l.rstrip()[:400]); continue
    d = json.loads(l.split(' kiln ', 1)[1]); print('$q $t', {k: d.get(k) for k in ('decode_tok_s', 'step_ms', 'first_run_s')})")
        done
      done ;;
    s32a)  # session 32 (~300 s): issue 13's 1B goal figures on an H200 (bf16, w4a16, w8a16 at batch 1, a process each),
      # each with its step's timeline (bench/step_timeline.py: marginal us by role inside the CUDA graph)
      CASES="1b:bf16 1b:w4a16 1b:w8a16" AB_TIMEOUT=150 bash "$0" s31a 2>&1 | grep -v "^bytecode\|^NVIDIA\|^===" ;;
    s32b)  # session 32, after s32a (~250 s): the 8B's w4a16 with its LM head at 4 bits against the default 8-bit head
      # (s24h; the default arm is the 8B w4a16 goal figure), then the 8B w8a16 goal figure (s31a). MODELS="1b 8b": the 1B too
      for m in ${MODELS:-8b}; do
        DECODE_JSON=decode_32b_$m.json timeout 200 python3 bench/decode.py --models $m --batches 1 --quantize w4a16 \
          --no-compile-peer --ab-config quantize_lm_head=True 2>&1 | grep "interleaved\|Error\|error\|timeline" | tail -5
      done
      CASES=8b:w8a16 AB_TIMEOUT=180 bash "$0" s31a 2>&1 | grep -v "^bytecode\|^NVIDIA\|^===" ;;
    s31a)  # session 31: issue 13's goals on an H200 with session 30's defaults (whole-K WORDS tiles, KILN_REFINE): the 1B
      # w8a16 and the 8B w8a16 / w4a16 at batch 1, a process each (the 1B bf16 / w4a16 in s30e); decode tok/s, step, first run
      for mq in ${CASES:-1b:w8a16 8b:w8a16 8b:w4a16}; do
        IFS=: read -r m q <<< "$mq"
        DECODE_JSON=decode_31a_$m$q.json timeout ${AB_TIMEOUT:-200} python3 bench/decode.py --models $m --batches 1 \
          $([ $q = bf16 ] || echo --quantize $q) --no-compile-peer 2>&1 | grep "kiln {\|Error\|error\|timeline\|refine:" | tail -5 \
          | python3 -c "import sys, json
for l in sys.stdin:
    if ' kiln {' not in l: print(l.rstrip()); continue
    d = json.loads(l.split(' kiln ', 1)[1]); print('$mq', {k: d.get(k) for k in ('decode_tok_s', 'step_ms', 'first_run_s')})"
      done ;;
    s29e)  # next: the tuner's cold decode decisions timed behind a predecessor (tuning.BEHIND_MB: a PDL-launched stream of
      # 32 MB filling every SM, as the GEMV before a GEMV does; its own time taken off), so what a candidate reads before
      # its PDL wait counts as in the plan's chain. The stream kernel's GPU test, then the 1B w4a16 and w8a16 at batch 1
      # against the default (candidates timed alone), one process each: the choices that move, and the tok/s
      timeout 120 python3 -m pytest -q -rf -m gpu tests/codegen/test_tuning.py 2>&1 | tail -2
      AB_TIMEOUT=260 ab_decode 29e tuning.BEHIND_MB=32 1b:w4a16 1b:w8a16 ;;
    s28c)  # session 28: the GPU tests of the compile / plan / pipeline paths not run on a GPU lately (the skinny and
      # decode-attention kernels' own tests ran in s26a / s27a), the failures' tracebacks to $OUT/s28c.log
      timeout 540 python3 -m pytest -q -rf -m gpu --tb=short -p no:logging tests/runtime tests/diffusion tests/api \
        tests/test_readme.py tests/llm/test_generator_kv.py tests/llm/test_sampling.py tests/passes tests/codegen/test_group_norm.py \
        tests/codegen/test_conv_epilogue.py tests/codegen/test_tma_gemm.py tests/codegen/test_aqgemm.py tests/codegen/test_attention_kv.py \
        tests/codegen/test_gemm.py tests/codegen/test_epilogue.py tests/codegen/test_epilogue_codes.py tests/codegen/test_act_codes.py \
        tests/codegen/test_qgemm.py tests/codegen/test_pointwise.py tests/codegen/test_tuning.py tests/codegen/test_greedy.py \
        2>&1 | tee "$OUT/s28c.log" | grep -E "^FAILED|^ERROR|passed|failed" | head -40 ;;
    s27h)  # next: the 1B prefill of 2048 tokens in w8a8 with its output head in int8 (quantize_lm_head=True) against the
      # default float head, bf16 the baseline, one process. Quality on pyllama (CPU, session 27): +0.06% held-out perplexity
      # against +0.02% with the float head (top-1 91% / 94%). Measured on an H100 (session 27): 1.248x -> 1.319x kiln's
      # bf16, the logits' error unchanged. Again on the H200 before w8a8 quantizes an LLM's head by default (the head rule
      # also covers DiT's proj_out, whose w8a8 error with it quantized is not measured: keep DiT's float or measure it)
      timeout 300 python3 bench/fp8.py --parts llm --modes bf16,w8a8,w8a8-head16 --out "$OUT/fp8_27h.json" 2>&1 \
        | grep -v "^ *{'x'\|^    " | tail -24 ;;
    s25g)  # next: session 25's Gemma / Gemma 2 / Gemma 3 (CPU-tested): their GPU tests (bf16 tokens against transformers'
      # with CUDA graphs; Gemma 2's soft-capped scores in kiln's attention kernels), the softcap kernel tests, then the
      # Gemma-3-1B and Gemma-2-2B shapes (random weights; head dim 256, 256k+ vocabularies, sliding layers' window_mask) at
      # batch 1 / 16 against static KV + torch.compile reduce-overhead. Predicted: tokens within bf16 noise; kiln
      # ~1.5-2.5x the peer at batch 1 (the float32-weight norms are row kernels, not GEMV prologues, and the 26 layers are
      # captured whole: compiles slower than the 1B's)
      timeout 200 python3 -m pytest -q -rf -m gpu tests/llm/test_generator.py -k "Gemma" 2>&1 | tail -3
      timeout 120 python3 -m pytest -q -rf -m gpu tests/codegen/test_attention.py tests/codegen/test_decode_attention.py 2>&1 | tail -3
      DECODE_JSON=decode_gemma.json timeout 560 python3 bench/decode.py --models gemma3-1b,gemma2-2b 2>&1 | grep -i "error" | tail -4
      python3 bench/decode_summary.py "$OUT/decode_gemma.json" ;;
    s22q)  # Qwen3-0.6B / 1.7B shapes (random weights), bf16 decode at batch 1 / 16 against static KV + torch.compile
      # reduce-overhead in the same process; their q / k norms run in the rope-decode attention (session 22, CPU)
      DECODE_JSON=decode_qwen3.json timeout 560 python3 bench/decode.py --models qwen3-0.6b,qwen3-1.7b 2>&1 | grep -i "error" | tail -4
      python3 bench/decode_summary.py "$OUT/decode_qwen3.json" ;;
    s22a | s22b)  # next: the IDOT tiles (one row of a 4-bit weight, each word's sum by dp4a against x in 16-bit fixed point;
      # ~2.2-2.9 SASS instructions a code against WORDS' 4.4-5.0). s22a: their GPU tests and the tuner's output
      # comparison's, then the 8B w4a16 at batch 1 against the same plans without them (one process, interleaved); s22b:
      # the 1B w4a16 likewise (~200 s a case). Each lists the candidates the tuner refused (none expected)
      cases="1b:w4a16"
      if [ $stage = s22a ]; then
        timeout 240 python3 -m pytest -q -x -m gpu tests/codegen/test_skinny_idot.py tests/codegen/test_tuning.py 2>&1 | tail -3
        # session 22 (CPU): Qwen3's q / k norms in the rope_kv kernel, and a Qwen3 generator's tokens against transformers'
        timeout 150 python3 -m pytest -q -rf -m gpu tests/codegen/test_rope_kv.py tests/codegen/test_decode_attention_rope.py \
          tests/llm/test_generator.py -k "qwen3 or Qwen3" \
          2>&1 | tail -3
        cases="8b:w4a16"
      fi
      ab_decode 22a kernels.skinny.IDOT=0 $cases
      # the decisions' refused candidates (tuning.OutputCheck: an output that differs from cuBLAS's on random inputs)
      python3 bench/tuning_dump.py "$KILN_CACHE_DIR" --top 0 | grep -B1 "failed" | tail -30 ;;
    s21a | s21d)  # next: the WORDS GEMV with NORM_POST (no statistics pass before its loop). s21a: GPU tests of every
      # NORM_POST config (1 / 16 rows, bf16 / int4 / int8), then the 8B w8a16 decode at batch 1 against the same plans
      # without those candidates, one process; s21d: the 8B w4a16 and 1B w8a16 likewise (a call each: ~600 s together).
      # Then s20f (the tuner's timings of the one-row gate/up)
      cases="8b:w4a16 1b:w8a16"
      if [ $stage = s21a ]; then
        timeout 200 python3 -m pytest -q -x -m gpu tests/codegen/test_skinny_norm_post.py tests/codegen/test_skinny.py -k \
          "norm_post or words" 2>&1 | tail -3
        cases="8b:w8a16"
      fi
      ab_decode 21a kernels.skinny.WORDS_NORM_POST=0 $cases ;;
    s21b)  # next: the one-row quantized GEMVs at the 8B's gate/up, down and qkv, every WORDS tile (deeper int8 pipelines, 4-warp
      # tiles capped at 128 / 96 registers), cold in one CUDA graph
      timeout 400 python3 bench/decode_gemm.py --out "$OUT/sweep_21b.json" --m 1 --sweep --kinds int4_g128 int8 \
        --shapes "8b gate/up glu" "8b down + residual" "8b qkv" 2>&1 | grep -v "^        " | tail -50 ;;
    s21c)  # next: the 1B's small one-row quantized GEMVs (qkv 3-6 MB, o 2-4 MB; 7-10 us cold in the plans, 0.3-0.6
      # TB/s) and its int8 LM head (263 MB, 83 us: 3.2 TB/s against bf16's 4.0), every WORDS tile at half / skinny's /
      # twice its split of K: whether no split (no partials, no last-program reduction) wins at the small ones as it did
      # for bf16 (skinny.WHOLE_K, session 5); since session 29 also 16-row tiles of a whole K = 2048 step (the peel then
      # reads a GEMV's whole weight slice before its PDL wait: the tuner's cold timing does not see that overlap), and
      # each configuration also timed as the tuner times it ("cold alone"): whether the two rank the configurations alike
      timeout 300 python3 bench/decode_gemm.py --out "$OUT/sweep_21c.json" --m 1 --sweep --kinds int4_g128 int8 \
        --shapes "1b qkv" "1b o + residual" "1b lm head" 2>&1 | grep -v "^        " | tail -50 ;;
    s20f)  # the tuner's cold timings of the 8B's one-row gate/up, every candidate (from the tuning cache), w8a16 and w4a16:
      # why the norm-fused GEMV (49.8 us cold in the w8a16 plan) beat norm kernel + WORDS (35.6 us alone under ncu, s20e)
      for mq in 8b:w8a16:28672 8b:w4a16:28672 1b:w8a16:16384; do
        IFS=: read -r m q rows <<< "$mq"
        echo "-- $m $q"
        KILN_CACHE_DIR=/tmp/kc-$m$q DECODE_JSON=decode_20f_$m$q.json timeout 200 python3 bench/decode.py --models $m \
          --batches 1 --quantize $q --no-compile-peer 2>&1 | grep -i "error" | tail -2
        python3 bench/tuning_dump.py /tmp/kc-$m$q --rows $rows | tee "$OUT/tuning_20f_$m$q.txt"
        python3 -c "import json; d = json.load(open('$OUT/decode_20f_$m$q.json'))['$m']['bs1']['kiln']; print('$q', \
          {k: d[k] for k in ('decode_tok_s', 'step_ms', 'choices')})"
      done ;;
    s20e)  # Nsight Compute on the 8B gate/up at one row, int8 and int4, every skinny config (why int8 stays ~2.3 TB/s with
      # 25% fewer instructions a code); the 1B / 8B w4a16 at batch 1 with the WORDS peel on for its 8-bit LM head against
      # KILN_PDL=1+noprefetch, one process each
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout 200 "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \
        --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis python3 bench/gemv_ncu.py --shape 8b \
        --bits 8 4 > "$OUT/ncu_20e.txt" 2>&1
      grep -E "^int[48] |Duration|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued|Registers Per" "$OUT/ncu_20e.txt" | head -90
      for m in 1b 8b; do
        DECODE_JSON=decode_20e_$m.json timeout 170 python3 bench/decode.py --models $m --batches 1 --quantize w4a16 \
          --no-compile-peer --ab-env "KILN_PDL=1+noprefetch" 2>&1 | grep "interleaved\|Error\|error" | tail -3
      done ;;
    s20d)  # the tuner's charge for a plain launch (cuBLAS) in a one-row decode decision (tuning.PLAIN_LAUNCH_MS) against
      # none, the 1B bf16 at batch 1, one process (the variant's decisions keyed apart, so measured again). Needs commit
      # bcc885e: the charge was taken out again after s20e (bench/NOTES.md, session 20)
      DECODE_JSON=decode_20d.json timeout 170 python3 bench/decode.py --models 1b --batches 1 --no-compile-peer \
        --ab-set tuning.PLAIN_LAUNCH_MS=0.0 2>&1 | grep "interleaved\|Error\|error" | tail -3
      python3 -c "import json; d = json.load(open('$OUT/decode_20d.json'))['1b']['bs1']; print('choices', \
        d['kiln']['choices'], '/ variant', d['kiln_variant']['choices'])" ;;
    s20b | s20c)  # the 8-bit WORDS codes by one PRMT (_words_step8) against session 19's shift + LOP3 (qweight_tiles.py of
      # 9cf8f9d, carried in out/ab), the w8a16 decode at batch 1 in one process per version (each its own tuning cache),
      # new / old / new, the WORDS peel (KILN_PDL=1+prefetch) interleaved in each. s20b: the GPU tests, the 1B; s20c: the 8B
      if [ $stage = s20b ]; then
        timeout 200 python3 -m pytest -q -x -m gpu tests/codegen/test_skinny.py -k "words" 2>&1 | tail -3
        m=1b; t=150
      else
        m=8b; t=190
      fi
      cp codegen/kernels/qweight_tiles.py /tmp/qt_new.py
      for v in new old new2; do
        if [ $v = old ]; then cp out/ab/qweight_tiles_9cf8f9d.py codegen/kernels/qweight_tiles.py; fi
        echo "-- $m $v"
        KILN_CACHE_DIR=/tmp/kiln-cache-$v DECODE_JSON=decode_20_${m}_$v.json timeout $t python3 bench/decode.py --models $m \
          --batches 1 --quantize w8a16 --no-compile-peer --ab-env "KILN_PDL=1+prefetch" 2>&1 | grep "interleaved\|Error\|error" | tail -3
        cp /tmp/qt_new.py codegen/kernels/qweight_tiles.py
        if [ $m = 8b ] && [ $v = old ]; then break; fi
      done ;;
    s20a)  # next: the WORDS GEMV's first step before its PDL wait (opt-in: KILN_PDL=1+prefetch) against the default, the
           # 1B quantized decode at batch 1, one process each
      for q in w4a16 w8a16; do
        DECODE_JSON=decode_20a_$q.json timeout 150 python3 bench/decode.py --models 1b --batches 1 --quantize $q \
          --no-compile-peer --ab-env "KILN_PDL=1+prefetch" 2>&1 | grep "interleaved\|Error\|error" | tail -3
      done ;;
    s19b)  # next: the 8B shape's quantized decode at batch 1 with the greedy kernel (333 / 399-401 tok/s before)
      for q in w8a16 w4a16; do
        DECODE_JSON=decode_19b_$q.json timeout 280 python3 bench/decode.py --models 8b --batches 1 --quantize $q \
          --no-compile-peer 2>&1 | grep -v '^ *\[\|^ *"\|^8b ' | tail -2
        python3 -c "import json; d = json.load(open('$OUT/decode_19b_$q.json'))['8b']['bs1']['kiln']; print('$q', \
          {k: d[k] for k in ('decode_tok_s', 'step_ms', 'between_steps_us', 'choices')})"
      done ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done $(date +%T)"
