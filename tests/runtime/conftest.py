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
