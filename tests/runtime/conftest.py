import pytest
import torch
import transformers

import kiln


@pytest.fixture
def cuda_llama_generator(tmp_path):
    """A function building a generator (kernels backend, CUDA graphs, one batch bucket) of one tiny float32 Llama on
    the GPU, each call compiling it again with the kernel cache in ``tmp_path``: the GPU tests of what a plan's
    environment changes (KILN_REFINE) compare two builds' tokens."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).float().eval().cuda()
    m.generation_config.eos_token_id = None

    def gen():
        return kiln.from_hf(m, max_seq=32, batch_buckets=(1,), eos_token_id=[],
                            config=kiln.CompileConfig(backend="kernels", cache_dir=str(tmp_path)))
    return gen


@pytest.fixture(scope="session")
def compile_quantized():
    """A function: (pipeline_models, **config) -> {(model, mode): (graph, inputs)} of the tiny Llama and DiT compiled with
    quantize="fp8" and "w8a8" (CompileConfig fields ``config`` besides), each calibrated on two samples: the quantized
    plans' tests (activation codes, blocks)."""
    return _compile_quantized


def _compile_quantized(pipeline_models, **config) -> dict:
    hf_llm, ids, llm_dims = pipeline_models["llama"]
    dit, dit_inputs, dit_dims = pipeline_models["dit"]
    llm, dt = hf_llm(), dit()
    out = {}
    for mode in ("fp8", "w8a8"):
        cfg = kiln.CompileConfig(quantize=mode, **config)
        calib = [(ids(1, 32, seed=10 + s),) for s in range(2)]
        out["llama", mode] = kiln.compile(llm, (ids(2, 7),), dynamic=llm_dims, config=cfg, calibration=calib).graph, [ids(2, 12, seed=24)]
        calib = [tuple(dit_inputs(2, seed=s).values()) for s in range(2)]
        out["dit", mode] = (kiln.compile(dt, tuple(dit_inputs(2).values()), dynamic=dit_dims, config=cfg, calibration=calib).graph,
                            list(dit_inputs(2, seed=7).values()))
    return out
