"""models/gptq.py: checkpoints already quantized in the GPTQ layout (AutoGPTQ / GPTQModel / transformers).

A tiny checkpoint directory is written with this file's own packer, from the layout as documented (codes packed along
K in int32 words, little end first; zeros packed along N, stored as zero - 1 in format v1). Checks: the converted
QuantWeight holds the checkpoint's codes, scales and zeros exactly; a generator built from the directory packs those
codes (merged QKV / gate-up from their parts) and its logits equal a float model on the dequantized weights; an act-order
checkpoint's codes are packed with each group's features consecutive and x gathered in that order; a checkpoint
of merged projections (Phi-3's qkv_proj / gate_up_proj) is split into the parts' codes; a g_idx that is not GPTQ's,
unsupported bits / groups and a contradicting quantize mode are refused with the reason."""
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import kiln
from kiln.codegen.tuning import Tuner
from kiln.errors import KilnError
from kiln.ir.graph import Graph
from kiln.ir.quant import QuantWeight, codes_of, dequantize, quantize_rtn
from kiln.llm.generator import Generator, new_caches, step_inputs
from kiln.models.gptq import GPTQConfig, load_gptq_llama, quant_weight, unpack_int32
from kiln.models.llama import LlamaStep
from kiln.passes.fuse_horizontal_gemm import fuse_horizontal_gemm
from kiln.passes.quantize_weights import QuantizeSpec, quantize_weights
from kiln.runtime.executor import Executor
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.down_proj")
CASES = {  # (bits, group_size, sym, checkpoint_format)
    "4bit-g32-sym-v1": (4, 32, True, "gptq"),
    "4bit-g32-asym-v2": (4, 32, False, "gptq_v2"),
    "4bit-g32-asym-v1": (4, 32, False, "gptq"),
    "8bit-channel-sym-v1": (8, -1, True, "gptq"),
    "8bit-channel-asym-v2": (8, -1, False, "gptq_v2"),
}


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integer codes -> int32 words, 32 / bits codes per word along ``dim``, code j at bits [j*bits, (j+1)*bits)."""
    per = 32 // bits
    c = codes.long() & (2 ** bits - 1)  # (a v1 zero of -1 packs as all ones, as AutoGPTQ's does)
    c = c.t() if dim == 1 else c
    words = sum(c[j::per] << (bits * j) for j in range(per))  # [R / per, C], each < 2**32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return (words.t() if dim == 1 else words).contiguous()


def gptq_layer(n: int, k: int, bits: int, group_size: int, sym: bool, fmt: str, gen: torch.Generator,
               act_order: bool | torch.Tensor = False) -> dict:
    """Random codes [N, K], scales and zeros [N, G] and the GPTQ tensors holding them. ``act_order``: the groups cut
    along an order of the input features (True: a random one), as AutoGPTQ's desc_act does (g_idx[order[i]] = i // group)."""
    group = k if group_size == -1 else group_size
    g = k // group
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    zeros = torch.full((n, g), 2 ** (bits - 1)) if sym else torch.randint(1, 2 ** bits, (n, g), generator=gen)
    scales = (0.02 + 0.03 * torch.rand(n, g, generator=gen)).half()
    stored = zeros - 1 if fmt == "gptq" else zeros
    g_idx = torch.arange(k) // group
    if act_order is not False:
        order = torch.randperm(k, generator=gen) if act_order is True else act_order
        g_idx = torch.empty_like(g_idx).scatter_(0, order, g_idx)
    return dict(codes=codes, zeros=zeros, scales=scales, g_idx=g_idx, tensors=dict(
        qweight=pack_int32(codes.t(), bits, 0), qzeros=pack_int32(stored.t(), bits, 1), scales=scales.t().contiguous(),
        g_idx=g_idx.to(torch.int32)))


def layout_weight(layer: dict) -> torch.Tensor:
    """The layout's own dequantization, float64: W[n, k] = scales[g_idx[k], n] * (q(k, n) - zero(g_idx[k], n))."""
    g_idx = layer["g_idx"]
    return (layer["codes"].double() - layer["zeros"].double()[:, g_idx]) * layer["scales"].double()[:, g_idx]


def write_tiny(path, quantization_config: dict, make_layer, seed=0, edit=None) -> dict:
    """A tiny Llama checkpoint directory with quantized linears: ``make_layer(layer, linear, (N, K), gen)`` -> the layer's
    dict (its checkpoint tensors under "tensors"); returns those dicts by prefix. ``edit(tensors)`` runs before saving."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**TINY)
    hf = transformers.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: v.detach().half() for k, v in hf.state_dict().items() if not k.endswith(tuple(f"{lin}.weight" for lin in LINEARS))}
    layers = {}
    for i in range(TINY["num_hidden_layers"]):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            layers[p] = make_layer(i, lin, tuple(hf.get_parameter(f"{p}.weight").shape), gen)
            tensors.update({f"{p}.{s}": t for s, t in layers[p]["tensors"].items()})
    if edit:
        edit(tensors)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**cfg.to_dict(), "quantization_config": quantization_config}))
    return layers


def write_checkpoint(path, bits, group_size, sym, fmt, seed=0, edit=None, act_order=False) -> dict:
    """A tiny Llama GPTQ checkpoint directory; returns each quantized layer's codes / zeros / scales by prefix.
    ``act_order``: GPTQ's desc_act, one random order of the input features for the linears that share an input (q / k /
    v, gate / up: one Hessian, so one order, as AutoGPTQ's are)."""
    first = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}
    orders = {}

    def make_layer(i, lin, shape, gen):
        key = (i, first.get(lin, lin))
        if act_order and key not in orders:
            orders[key] = torch.randperm(shape[1], generator=gen)
        layer = gptq_layer(*shape, bits, group_size, sym, fmt, gen, act_order and orders[key])
        layer["tensors"]["bias"] = torch.zeros(shape[0], dtype=torch.float16)  # AutoGPTQ writes one for every layer
        return layer

    q = dict(quant_method="gptq", bits=bits, group_size=group_size, desc_act=act_order, sym=sym, checkpoint_format=fmt)
    return write_tiny(path, q, make_layer, seed, edit)


@pytest.mark.parametrize("act_order", [False, True], ids=["", "act-order"])
@pytest.mark.parametrize("case", CASES)
def test_quant_weight_holds_the_checkpoints_codes_scales_and_zeros_exactly(case, act_order):
    bits, group_size, sym, fmt = CASES[case]
    layer = gptq_layer(48, 128, bits, group_size, sym, fmt, torch.Generator().manual_seed(1), act_order)
    qw = quant_weight("p", layer["tensors"], GPTQConfig(bits, group_size, act_order, sym, fmt))
    assert qw.shape == (48, 128) and qw.bits == bits and qw.group == (128 if group_size == -1 else group_size)
    # act order (grouped, not per channel): the features sorted by group, each group's in the checkpoint's order
    moved = act_order and group_size != -1
    order = torch.sort(layer["g_idx"], stable=True).indices if moved else torch.arange(128)
    assert (qw.perm is not None) == moved and (not moved or torch.equal(qw.perm, order))
    assert torch.equal(codes_of(qw).long(), layer["codes"][:, order])
    assert torch.equal(qw.scales, layer["scales"])
    assert qw.symmetric == sym and (sym or torch.equal(qw.zeros.long(), layer["zeros"]))
    assert torch.equal(dequantize(qw, torch.float64), layout_weight(layer))


def test_unpack_reads_every_bit_of_a_word():
    words = torch.tensor([[-1, 0x12345678], [0x7FFFFFFF, -0x80000000]], dtype=torch.int32)  # [2, 2]
    assert unpack_int32(words, 4, 1)[0].tolist() == [15] * 8 + [8, 7, 6, 5, 4, 3, 2, 1]
    assert unpack_int32(words, 8, 0)[:, 1].tolist() == [0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0x80]


def prefill_logits(step, ids: list[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The last position's logits of a prefill of ``ids`` through ``step`` (a compiled step or an eager LlamaStep)."""
    spec = dict(vocab_size=97, num_layers=2, kv_heads=2, head_dim=16, max_seq=32)
    caches = new_caches(spec, 1, dtype, device)
    inputs = step_inputs(torch.tensor([ids], device=device), torch.zeros(1, dtype=torch.long, device=device), 0, caches, 32, None)
    if isinstance(step, LlamaStep):
        with torch.no_grad():
            return step(*(inputs[k] for k in ("input_ids", "positions", "slots", "mask")), tuple(caches.values()))
    return step(**inputs)


def matches_float_model(g: Generator, model, new: int = 5) -> list[int]:
    """Assert that generator ``g``'s prefill logits match the eager float ``model``'s and that its greedy tokens are the
    model's; returns those tokens."""
    for ids in ([5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]):
        assert rel_err(prefill_logits(g.compiled, ids), prefill_logits(LlamaStep(model), ids)) <= TOL[torch.float32]
    ids = [5, 6, 7]
    for _ in range(new):
        ids.append(int(prefill_logits(LlamaStep(model), ids).argmax()))
    assert g.generate([[5, 6, 7]], max_new_tokens=new).tokens[0] == ids[3:]
    return ids[3:]


def qgemm_codes(graph: Graph) -> dict[str, torch.Tensor]:
    """Each QGEMM's weight's codes [N, K], by the packed weight's name."""
    out = {}
    for n in graph.nodes:
        if n.op == "QGEMM":
            name, bits = n.inputs[1].attrs["name"], n.attrs["bits"]
            q = graph.weights[name]
            out[name.removesuffix(".qweight")] = torch.stack((q & 0xF, q >> 4), -1).flatten(-2) if bits == 4 else q
    return out


@pytest.mark.parametrize("case", ["4bit-g32-asym-v1", "8bit-channel-sym-v1"])
def test_generator_packs_the_checkpoints_codes_and_matches_the_dequantized_float_model(case, tmp_path):
    bits, group_size, sym, fmt = CASES[case]
    layers = write_checkpoint(tmp_path / "ckpt", bits, group_size, sym, fmt)
    g = Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, max_seq=32, batch_buckets=(1,), eos_token_id=[],
                                  config=kiln.CompileConfig(backend="reference"))
    graph = g.compiled.graph
    assert g.compiled.config.quantize == f"w{bits}a16" and graph.histogram()["QGEMM"] == 8
    # one merged QKV, one o_proj, one merged gate/up and one down_proj per layer; the LM head stays float
    got = sorted(qgemm_codes(graph).values(), key=lambda c: (c.shape[0], c.shape[1], c.flatten()[:64].tolist()))
    want = []
    for i in range(2):
        parts = [layers[f"model.layers.{i}.{lin}"]["codes"] for lin in LINEARS]
        want += [torch.cat(parts[:3]), parts[3], torch.cat(parts[4:6]), parts[6]]
    want.sort(key=lambda c: (c.shape[0], c.shape[1], c.flatten()[:64].tolist()))
    assert all(torch.equal(a.long(), b) for a, b in zip(got, want))
    notes = g.compiled.report().to_dict()["passes"]["quantize_weights"]["notes"]
    assert "pre-quantized in the checkpoint: 14 packed from its codes" in notes[0]
    assert sum(f"{bits}-bit" in n and " checkpoint: weight error" in n for n in notes) == 8
    # the float model on the dequantized weights (float32, eager), and greedy generation against it
    model, quantized, cfg = load_gptq_llama(tmp_path / "ckpt")
    assert cfg == GPTQConfig(bits, group_size, False, sym, fmt) and len(quantized) == 14
    for ids in ([5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]):
        want = prefill_logits(LlamaStep(model), ids)
        assert rel_err(prefill_logits(g.compiled, ids), want) <= TOL[torch.float32]
    ids = [5, 6, 7]
    for _ in range(6):
        ids.append(int(prefill_logits(LlamaStep(model), ids).argmax()))
    assert g.generate([[5, 6, 7]], max_new_tokens=6).tokens[0] == ids[3:]


@pytest.mark.parametrize("case", ["4bit-g32-asym-v1", "4bit-g32-sym-v1"])
def test_an_act_order_checkpoint_gathers_x_in_its_group_order(case, tmp_path):
    # desc_act: each group's features are scattered over K (g_idx); kiln packs the codes with every group's features
    # consecutive and gathers x in that order before the GEMM (one INDEX a QGEMM; q / k / v and gate / up still merged)
    bits, group_size, sym, fmt = CASES[case]
    layers = write_checkpoint(tmp_path / "ckpt", bits, group_size, sym, fmt, act_order=True)
    g = Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, max_seq=32, batch_buckets=(1,), eos_token_id=[])
    graph = g.compiled.graph
    # a gather before qkv, o and gate / up; the down projection's folded into the gate / up GEMM's output order
    assert graph.histogram()["QGEMM"] == 8 and graph.histogram()["INDEX"] == 6
    for n in (n for n in graph.nodes if n.op == "QGEMM"):
        x = n.inputs[0]
        if x.op == "QGEMM":
            assert x.attrs["glu"] and n.attrs["group"] == 32
            continue
        perm = graph.weights[x.inputs[1].attrs["name"]]
        assert x.op == "INDEX" and perm.dtype == torch.int64 and not torch.equal(perm, torch.arange(len(perm)))
    notes = g.compiled.report().to_dict()["passes"]["quantize_weights"]["notes"]
    assert sum("input features in the checkpoint's act order" in n for n in notes) == 8
    assert "act order: 2 of the 8 gathers of x folded into the producing QGEMM's output order at compile time, 6 run" in notes
    model, quantized, cfg = load_gptq_llama(tmp_path / "ckpt")
    assert cfg.desc_act and all(torch.equal(dequantize(qw, torch.float64), layout_weight(layers[name.removesuffix(".weight")]))
                                for name, qw in quantized.items())
    ids = matches_float_model(g, model)
    g.save(tmp_path / "g.kiln")  # the order is a weight of the artifact: the loaded generator gathers alike
    assert Generator.load(tmp_path / "g.kiln").generate([[5, 6, 7]], max_new_tokens=5).tokens[0] == ids


def test_a_g_idx_that_is_not_gptqs_bad_bits_bad_groups_and_another_mode_are_refused(tmp_path):
    def uneven(tensors):  # group 0 has 33 features, group 1 has 31
        tensors["model.layers.0.self_attn.q_proj.g_idx"][32] = 0

    write_checkpoint(tmp_path / "act", 4, 32, True, "gptq", edit=uneven, act_order=True)
    with pytest.raises(KilnError, match="q_proj: g_idx does not give each of the 2 groups exactly 32 input features"):
        Generator.from_pretrained(tmp_path / "act", dtype=torch.float32, max_seq=32, batch_buckets=(1,))
    layer = gptq_layer(8, 64, 4, 32, True, "gptq", torch.Generator().manual_seed(2), act_order=True)
    del layer["tensors"]["g_idx"]
    with pytest.raises(KilnError, match="act-order .* without p.g_idx"):
        quant_weight("p", layer["tensors"], GPTQConfig(4, 32, True, True, "gptq"))
    write_checkpoint(tmp_path / "ok", 4, 32, True, "gptq")
    for key, value, match in (("bits", 3, "a 3-bit GPTQ checkpoint"), ("group_size", 256, "group_size 256"),
                              ("quant_method", "bitsandbytes", "'bitsandbytes' is not read")):
        cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
        cfg["quantization_config"][key] = value
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(KilnError, match=match):
            Generator.from_pretrained(tmp_path / "bad", dtype=torch.float32)
    with pytest.raises(KilnError, match="4-bit GPTQ checkpoint .*quantize='w8a16' would quantize"):
        Generator.from_pretrained(tmp_path / "ok", dtype=torch.float32, quantize="w8a16")


@pytest.mark.parametrize("case", ["4bit-g32-asym-v1", "8bit-channel-sym-v1"])
def test_merged_projection_codes_are_split_into_their_parts(case, tmp_path):
    # Phi-3 style checkpoints quantize the merged qkv_proj / gate_up_proj: their codes, scales and zeros split by rows
    # into q / k / v and gate / up (split_merged), then packed from the checkpoint as the unmerged checkpoint's are
    bits, group_size, sym, fmt = CASES[case]

    def merge(tensors):
        for i in range(TINY["num_hidden_layers"]):
            for merged, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))):
                p = f"model.layers.{i}."
                for s, dim in (("qweight", 1), ("qzeros", 1), ("scales", 1), ("bias", 0)):
                    tensors[f"{p}{merged}.{s}"] = torch.cat([tensors.pop(f"{p}{x}.{s}") for x in parts], dim)
                tensors[f"{p}{merged}.g_idx"] = tensors.pop(f"{p}{parts[0]}.g_idx")
                for x in parts[1:]:
                    del tensors[f"{p}{x}.g_idx"]

    layers = write_checkpoint(tmp_path / "merged", bits, group_size, sym, fmt, edit=merge)
    write_checkpoint(tmp_path / "parts", bits, group_size, sym, fmt)
    (model, quantized, _), (_, want, _) = load_gptq_llama(tmp_path / "merged"), load_gptq_llama(tmp_path / "parts")
    assert sorted(quantized) == sorted(want) and len(quantized) == 14
    for name, qw in quantized.items():
        assert torch.equal(codes_of(qw).long(), layers[name.removesuffix(".weight")]["codes"])
        assert torch.equal(qw.scales, want[name].scales) and (sym or torch.equal(qw.zeros, want[name].zeros))
    config = kiln.CompileConfig(backend="reference")
    merged, parts = (Generator.from_pretrained(tmp_path / d, dtype=torch.float32, max_seq=32, batch_buckets=(1,),
                                               eos_token_id=[], config=config) for d in ("merged", "parts"))
    assert merged.compiled.graph.histogram()["QGEMM"] == 8
    notes = merged.compiled.report().to_dict()["passes"]["quantize_weights"]["notes"]
    assert "pre-quantized in the checkpoint: 14 packed from its codes" in notes[0]
    for ids in ([5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]):
        assert torch.equal(prefill_logits(merged.compiled, ids), prefill_logits(parts.compiled, ids))
        assert rel_err(prefill_logits(merged.compiled, ids), prefill_logits(LlamaStep(model), ids)) <= TOL[torch.float32]


def test_a_multimodal_checkpoints_decoder_codes_are_read_under_the_text_models_names(tmp_path):
    # Gemma 3's multimodal checkpoints store the decoder under language_model.* beside a vision tower (quantized too,
    # in some): the decoder's codes are packed as a text checkpoint's, the vision tower's layers dropped
    def nest(tensors):
        for name in list(tensors):
            tensors["language_model." + name] = tensors.pop(name)
        tower = gptq_layer(16, 64, 4, 32, False, "gptq", torch.Generator().manual_seed(3))["tensors"]
        tensors.update({f"vision_tower.encoder.layers.0.mlp.fc1.{s}": t for s, t in tower.items()})

    layers = write_checkpoint(tmp_path / "mm", 4, 32, False, "gptq", edit=nest)
    write_checkpoint(tmp_path / "text", 4, 32, False, "gptq")
    (model, quantized, _), (plain, want, _) = load_gptq_llama(tmp_path / "mm"), load_gptq_llama(tmp_path / "text")
    assert sorted(quantized) == sorted(want) and len(quantized) == 14
    for name, qw in quantized.items():
        assert torch.equal(codes_of(qw).long(), layers[name.removesuffix(".weight")]["codes"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    g = Generator.from_pretrained(tmp_path / "mm", dtype=torch.float32, max_seq=32, batch_buckets=(1,), eos_token_id=[],
                                  config=kiln.CompileConfig(backend="reference"))
    notes = g.compiled.report().to_dict()["passes"]["quantize_weights"]["notes"]
    assert "pre-quantized in the checkpoint: 14 packed from its codes" in notes[0]


def test_a_v1_zero_point_that_wrapped_around_is_refused():
    layer = gptq_layer(8, 64, 4, 32, False, "gptq", torch.Generator().manual_seed(2))
    layer["tensors"]["qzeros"] = pack_int32(torch.full((2, 8), -1), 4, 1)  # zero 0 stored as -1: reads back as 16
    with pytest.raises(KilnError, match="zero point of 16"):
        quant_weight("p", layer["tensors"], GPTQConfig(4, 32, False, False, "gptq"))


def merged_graph(gen) -> tuple[Graph, dict]:
    """x -> LINEAR(x, a), LINEAR(x, b) fused into one LINEAR on [a; b] (the parts recorded)."""
    g = Graph()
    x = g.add_input("x", (3, 64), "float32")
    ws = {name: torch.randn(n, 64, generator=gen) for name, n in (("a.weight", 24), ("b.weight", 40))}
    outs = [g.add("LINEAR", [x, g.add_weight(name, w)]) for name, w in ws.items()]
    heads = [g.add("SLICE", [o], axis=1, start=0, end=24) for o in outs]  # [3, 24] each
    g.set_outputs([g.add("ADD", heads)], ["y"])
    assert fuse_horizontal_gemm(g).rewritten == 1
    return g, ws


def test_merged_weight_is_built_from_its_parts_or_quantized_as_usual_when_they_differ():
    gen = torch.Generator().manual_seed(3)
    g, ws = merged_graph(gen)
    [(merged, parts)] = g.weight_parts.items()
    assert parts == (("a.weight", 0, 24), ("b.weight", 24, 64))
    pre = {name: quantize_rtn(w, 4, 32, False) for name, w in ws.items()}
    stats = quantize_weights(g, QuantizeSpec("w4a16", 32, False), prequantized=pre)
    [node] = [n for n in g.nodes if n.op == "QGEMM"]
    assert stats.rules == {"checkpoint": 1} and node.attrs["zeros"]
    assert torch.equal(g.weights[node.inputs[1].attrs["name"]], torch.cat([pre["a.weight"].qweight, pre["b.weight"].qweight]))
    assert torch.equal(g.weights[node.inputs[2].attrs["name"]], torch.cat([pre["a.weight"].scales, pre["b.weight"].scales]))
    assert torch.equal(g.weights[node.inputs[3].attrs["name"]], torch.cat([pre["a.weight"].zeros, pre["b.weight"].zeros]))
    # parts of different groups: the merged weight is quantized as usual, and the note says why
    g, ws = merged_graph(gen)
    pre = {"a.weight": quantize_rtn(ws["a.weight"], 4, 32, False), "b.weight": quantize_rtn(ws["b.weight"], 4, 64, False)}
    stats = quantize_weights(g, QuantizeSpec("w4a16", 32, False), prequantized=pre)
    assert stats.rules == {"rtn": 1} and "different bits / groups / symmetry" in stats.notes[1]
    # act order: parts with one order of their shared input merge, x gathered once; parts of two orders do not
    order = torch.randperm(64, generator=gen)
    for second, rule in ((order, "checkpoint"), (torch.randperm(64, generator=gen), "rtn")):
        g, ws = merged_graph(gen)
        pre = {}
        for (name, w), perm in zip(ws.items(), (order, second)):
            p = quantize_rtn(w[:, perm], 4, 32, False)
            pre[name] = QuantWeight(p.qweight, p.scales, p.zeros, 4, 32, p.shape, perm)
        stats = quantize_weights(g, QuantizeSpec("w4a16", 32, False), prequantized=pre)
        assert stats.rules == {rule: 1} and g.histogram().get("INDEX", 0) == (rule == "checkpoint")
        assert rule == "checkpoint" or "order their input features differently in the checkpoint (act order)" in stats.notes[1]
    # none of the parts quantized in the checkpoint: it stays float
    g, ws = merged_graph(gen)
    stats = quantize_weights(g, QuantizeSpec("w4a16", 32, False), prequantized={})
    assert stats.rewritten == 0 and "checkpoint stores this weight unquantized" in str(stats.declined)


def test_cli_compiles_a_gptq_directory_into_a_generator_with_its_codes(tmp_path, capsys):
    from kiln.cli import main

    write_checkpoint(tmp_path / "ckpt", 4, 32, False, "gptq_v2")
    out = tmp_path / "g.kiln"
    args = ["compile", "--model", "llama-tiny", "--weights", str(tmp_path / "ckpt")]
    assert main(args + ["-o", str(out), "-q"]) == 1
    assert "is a quantized (GPTQ / AWQ) checkpoint" in capsys.readouterr().err
    args += ["--max-seq", "32", "--batch-buckets", "1"]
    assert main(args + ["--generate", "--quantize", "w8a16", "-o", str(out), "-q"]) == 1
    assert "quantize='w8a16' would quantize" in capsys.readouterr().err
    assert main(args + ["--generate", "-o", str(out), "-q", "--report"]) == 0
    assert "pre-quantized in the checkpoint" in capsys.readouterr().out
    g = Generator.load(out)
    assert g.compiled.graph.histogram()["QGEMM"] == 8
    want = Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, max_seq=32, batch_buckets=(1,), eos_token_id=[])
    assert g.generate([[5, 6, 7]], max_new_tokens=5).tokens == want.generate([[5, 6, 7]], max_new_tokens=5).tokens


@pytest.mark.gpu
@pytest.mark.parametrize("case, act_order", [("4bit-g32-asym-v1", False), ("4bit-g32-sym-v1", False),
                                             ("8bit-channel-sym-v1", False), ("4bit-g32-asym-v1", True)])
def test_gpu_bf16_gptq_generator_matches_the_eager_dequantized_model(case, act_order, tmp_path):
    """bf16 on CUDA, kernels backend (the QGEMM kernels read the checkpoint's codes): prefill logits against the eager
    model on the dequantized weights in float64; the errors over eight prompts at most those of the same eager model in
    bf16 on CUDA (two bf16 computations differ from each other by about the sum of their errors), with slack for
    rounding order. (Summed: one prompt's ratio swings widely, 0.65-1.5 on the CPU's reference backend against the eager
    model, and an H100 gave 2.1 on [5, 6, 7] at 8 bits, session 27, where the CPU's sum over twelve prompts is 0.995.)"""
    bits, group_size, sym, fmt = CASES[case]
    write_checkpoint(tmp_path / "ckpt", bits, group_size, sym, fmt, act_order=act_order)
    g = Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device="cuda", max_seq=32, batch_buckets=(1,),
                                  eos_token_id=[])
    assert g.compiled.graph.histogram()["QGEMM"] == 8 and g.compiled.graph.histogram().get("INDEX", 0) == 6 * act_order
    eager = {dt: LlamaStep(load_gptq_llama(tmp_path / "ckpt", dtype=dt)[0].to("cuda")) for dt in (torch.bfloat16, torch.float64)}
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]] + torch.randint(0, 97, (6, 6), generator=torch.Generator().manual_seed(0)).tolist()
    errs = []  # (eager bf16, kiln) against float64
    for ids in prompts:
        exact = prefill_logits(eager[torch.float64], ids, torch.float64, "cuda")
        errs.append([rel_err(prefill_logits(m, ids, torch.bfloat16, "cuda").double(), exact) for m in (eager[torch.bfloat16], g.compiled)])
    eager_sum, kiln_sum = map(sum, zip(*errs))
    assert kiln_sum <= max(len(prompts) * TOL[torch.bfloat16], 1.5 * eager_sum), errs


def test_compile_matches_prequantized_parameters_by_storage():
    lin = torch.nn.Linear(64, 24, bias=False)
    qw = quantize_rtn(lin.weight.detach(), 4, 32, True)
    x = torch.randn(3, 64)
    with pytest.raises(KilnError, match="config.quantize=None turns off"):
        kiln.compile(lin, (x,), prequantized=[(lin.weight, qw)])
    with pytest.raises(KilnError, match="1 of the 1 prequantized weights are not weights the captured graph reads"):
        kiln.compile(lin, (x,), config=kiln.CompileConfig(quantize="w4a16"), prequantized=[(lin.weight.clone(), qw)])
    m = kiln.compile(lin, (x,), config=kiln.CompileConfig(quantize="w4a16", backend="reference"), prequantized={lin.weight: qw})
    [node] = [n for n in m.graph.nodes if n.op == "QGEMM"]
    assert torch.equal(m.graph.weights[node.inputs[1].attrs["name"]], qw.qweight)
    assert rel_err(m(x), x @ dequantize(qw).t()) <= TOL[torch.float32]


@pytest.mark.parametrize("rows", [1, 24])
def test_kernels_gather_x_for_an_act_order_weight(rows, tmp_path, monkeypatch):
    # the kernels backend (Triton's kernels interpreted on the CPU): INDEX(x, perm), then the QGEMM's Triton kernel on
    # the packed codes (1 row: the skinny template; 24: the qgemm template)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))
    layer = gptq_layer(24, 64, 4, 32, False, "gptq", torch.Generator().manual_seed(4), act_order=True)
    qw = quant_weight("p", layer["tensors"], GPTQConfig(4, 32, True, False, "gptq"))
    lin = torch.nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(dequantize(qw))
    x = torch.randn(rows, 64)
    m = kiln.compile(lin, (x,), config=kiln.CompileConfig(quantize="w4a16", backend="reference"), prequantized={lin.weight: qw})
    assert m.graph.histogram()["INDEX"] == 1 and m.graph.histogram()["QGEMM"] == 1
    ex = Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"gemm": "triton"})))
    assert rel_err(ex.run([x])[0].double(), x.double() @ layout_weight(layer).t()) <= TOL[torch.float32]
    assert sum(n for c, n in ex.plans[0].describe()["choices"].items() if c.startswith("gemm:triton-")) == 1


# ----------------------------------------------------------------------------- AWQ's GEMM layout

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: position i of a word holds output column 8 * word + AWQ_ORDER[i]


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes [R, N] -> int32 [R, N / 8] packed as AutoAWQ's WQLinear_GEMM does (position i at bits 4i)."""
    c = codes.long().reshape(codes.shape[0], -1, 8)
    words = sum(c[:, :, AWQ_ORDER[i]] << (4 * i) for i in range(8))
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def awq_layer(n: int, k: int, group: int, gen: torch.Generator) -> dict:
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(0, 16, (n, k // group), generator=gen)
    scales = (0.02 + 0.03 * torch.rand(n, k // group, generator=gen)).half()
    return dict(codes=codes, zeros=zeros, scales=scales, g_idx=torch.arange(k) // group, tensors=dict(
        qweight=pack_awq(codes.t()), qzeros=pack_awq(zeros.t()), scales=scales.t().contiguous()))


def write_awq_checkpoint(path, group=32, seed=0) -> dict:
    """A tiny Llama AWQ checkpoint (version gemm)."""
    q = dict(quant_method="awq", bits=4, group_size=group, zero_point=True, version="gemm")
    return write_tiny(path, q, lambda i, lin, shape, gen: awq_layer(*shape, group, gen), seed)


def test_awq_weight_holds_the_checkpoints_codes_scales_and_zeros_exactly():
    layer = awq_layer(48, 128, 64, torch.Generator().manual_seed(5))
    qw = quant_weight("p", layer["tensors"], GPTQConfig(4, 64, False, False, "awq"))
    assert qw.shape == (48, 128) and qw.group == 64 and qw.perm is None
    assert torch.equal(codes_of(qw).long(), layer["codes"]) and torch.equal(qw.zeros.long(), layer["zeros"])
    assert torch.equal(qw.scales, layer["scales"])
    assert torch.equal(dequantize(qw, torch.float64), layout_weight(layer))


def test_generator_packs_an_awq_checkpoints_codes(tmp_path):
    layers = write_awq_checkpoint(tmp_path / "ckpt")
    g = Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, max_seq=32, batch_buckets=(1,), eos_token_id=[])
    graph = g.compiled.graph
    assert g.compiled.config.quantize == "w4a16" and graph.histogram()["QGEMM"] == 8
    got = sorted(qgemm_codes(graph).values(), key=lambda c: (c.shape[0], c.flatten()[:64].tolist()))
    want = []
    for i in range(2):
        parts = [layers[f"model.layers.{i}.{lin}"]["codes"] for lin in LINEARS]
        want += [torch.cat(parts[:3]), parts[3], torch.cat(parts[4:6]), parts[6]]
    want.sort(key=lambda c: (c.shape[0], c.flatten()[:64].tolist()))
    assert all(torch.equal(a.long(), b) for a, b in zip(got, want))
    model, quantized, cfg = load_gptq_llama(tmp_path / "ckpt")
    assert cfg.method == "AWQ" and len(quantized) == 14
    matches_float_model(g, model)
    with pytest.raises(KilnError, match="is a 4-bit AWQ checkpoint .*quantize='w8a16' would quantize"):
        Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, quantize="w8a16")


@pytest.mark.parametrize("q, match", [(dict(version="gemv"), "AWQ version 'gemv'"),
                                      (dict(zero_point=False), "without zero points"),
                                      (dict(group_size=256), "AWQ group_size 256")])
def test_awq_layouts_kiln_cannot_read_are_refused_by_name(q, match, tmp_path):
    cfg = {**TINY, "quantization_config": {**dict(quant_method="awq", bits=4, group_size=32, zero_point=True), **q}}
    tmp_path.joinpath("config.json").write_text(json.dumps(cfg))
    with pytest.raises(KilnError, match=match):
        Generator.from_pretrained(tmp_path, dtype=torch.float32)
