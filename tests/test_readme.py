"""Every code block of README.md runs as written: each ```python block, and the `kiln ...` lines of each shell
block (through ``kiln.cli.main``, which must exit 0), on the CPU with tiny models in place of the real ones.

What a block's placeholders stand for:
    torch, kiln           imported
    model, hf_model       a tiny transformers LlamaForCausalLM (1 layer, hidden 32, head_dim 16) with Llama 3's vocabulary
                          size, 128256, so the README's token ids fit; a fresh copy per block (a block may move it)
    tok                   a word-level tokenizer over that vocabulary ("w0" .. "w128255")
    input_ids             int64 [2, 8], ids below 96; mask, attention_mask: ones [2, 8]; inputs: {"input_ids": input_ids}
    model.kiln            `model` compiled for input_ids [batch, seq]
    model.pt2             torch.export.save of Linear(6, 3) + GELU on x [2, 6]
    model.onnx            (input_ids, attention_mask) -> [batch, seq, 4], dims named batch and seq (opset 17)
    inputs.safetensors    input_ids [2, 8] for the built-in llama-tiny
    ckpt/Llama-3.2-1B     `model` and `tok` saved as an HF checkpoint; `~/ckpt/...` in a command means it too
    ckpt/Qwen3-0.6B       a tiny random Qwen3 of the same vocabulary, with `tok`, saved likewise
    calib.txt             a few lines of text (calibration data for --quantize ... --calib)
    pipe, pixart_pipe     tiny diffusers DiT (1000 classes) and PixArt-α pipelines (tests/diffusion/conftest.py), float32
    ckpt/DiT-XL-2-256     `pipe` saved as a diffusers pipeline directory
    pixart.kiln           `pixart_pipe` compiled by kiln.diffusion
Each block runs in a fresh directory holding the files above that it reads (those it does not write itself).
Optional parts of a command (`[--graph]`) are run included.

A block that needs what the test machine may lack carries a marker comment: `# (needs a GPU)` makes it a
``gpu`` test (run by `make test-gpu`, skipped without CUDA); any other `# (needs ...)`, e.g. the network, skips
it. MARKED lists the marked blocks, so that a marker is never added silently.
"""
import copy
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

import kiln
from kiln.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
MARKED = {("How a graph runs", "needs a GPU"),  # (section, marker) of every marked block
          ("Tensor parallel", "needs 2 processes: torchrun --nproc-per-node 2 script.py")}
VOCAB = 128256


@dataclass
class Block:
    line: int  # of the opening fence in README.md
    lang: str  # "python" | "shell"
    section: str  # the "## " heading above it
    text: str
    marker: str | None  # "needs a GPU", ... or None


def readme_blocks() -> list[Block]:
    """The python blocks, and the shell blocks with a `kiln ` command line, in README order."""
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        lang, body = m.group(1) or "shell", m.group(2)
        if lang == "shell" and not any(line.startswith("kiln ") for line in body.splitlines()):
            continue  # `make` targets, error messages, the layout
        headings = re.findall(r"^## (.+)$", text[:m.start()], re.M)
        marker = re.search(r"#\s*\((needs [^)]*)\)", body)
        blocks.append(Block(text.count("\n", 0, m.start()) + 1, lang, headings[-1] if headings else "",
                            body.replace("~/ckpt/", "ckpt/"), marker and marker.group(1)))
    return blocks


BLOCKS = readme_blocks()


def test_the_blocks_are_found_and_the_marked_ones_listed():
    assert sum(b.lang == "python" for b in BLOCKS) >= 8 and sum(b.lang == "shell" for b in BLOCKS) >= 3
    assert {(b.section, b.marker) for b in BLOCKS if b.marker} == MARKED


# ----------------------------------------------------------------------------- placeholders


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1")


class Onnx(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(96, 8)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.emb(input_ids) * attention_mask.unsqueeze(-1).float())  # [batch, seq, 4]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """The placeholder objects, and a directory holding one copy of every placeholder file."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model, tok = transformers.LlamaForCausalLM(cfg).eval(), word_tokenizer()
    input_ids = torch.randint(0, 96, (2, 8))
    files = tmp_path_factory.mktemp("readme-files")
    kiln.compile(model, (input_ids,), dynamic={"input_ids": {0: "batch", 1: "seq"}}).save(files / "model.kiln")
    lin = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.GELU())
    torch.export.save(torch.export.export(lin, (torch.randn(2, 6),)), files / "model.pt2")
    axes = {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(Onnx().eval(), (input_ids, torch.ones(2, 8, dtype=torch.long)), files / "model.onnx", dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], dynamic_axes={"input_ids": axes, "attention_mask": axes})
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 256, (2, 8))}, files / "inputs.safetensors")
    (files / "calib.txt").write_text("def read_config(path):\n    with open(path) as f:\n        return f.read()\n" * 8)
    model.save_pretrained(files / "ckpt" / "Llama-3.2-1B")
    tok.save_pretrained(files / "ckpt" / "Llama-3.2-1B")
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**cfg.to_dict(), "head_dim": 8}))
    qwen3.save_pretrained(files / "ckpt" / "Qwen3-0.6B")
    tok.save_pretrained(files / "ckpt" / "Qwen3-0.6B")
    names = {"torch": torch, "kiln": kiln, "model": model, "hf_model": model, "tok": tok, "input_ids": input_ids,
             "mask": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "inputs": {"input_ids": input_ids}}
    return names, files


@pytest.fixture(scope="module")
def diffusion_stand_ins(stand_ins):
    """The diffusion placeholders, built only for the blocks of the diffusion section (diffusers may be absent)."""
    import importlib.util

    import kiln.diffusion

    path = Path(__file__).resolve().parent / "diffusion" / "conftest.py"
    spec = importlib.util.spec_from_file_location("kiln_readme_diffusion_stand_ins", path)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    names, files = stand_ins
    pipe, pixart_pipe = tiny.tiny_dit_pipeline(), tiny.tiny_pixart_pipeline()
    pipe.save_pretrained(files / "ckpt" / "DiT-XL-2-256")
    kiln.diffusion.PixArtPipeline.from_diffusers(tiny.tiny_pixart_pipeline(), max_batch=2).save(files / "pixart.kiln")
    return {**names, "pipe": pipe, "pixart_pipe": pixart_pipe}, files


def _prepare(block: Block, files: Path, here: Path) -> None:
    """Copy into ``here`` the placeholder files the block reads (mentions, and does not write first)."""
    written = set(re.findall(r'(?:-o\s+|\.save\(")([^\s"]+)', block.text))
    for name in ("model.kiln", "model.pt2", "model.onnx", "inputs.safetensors", "ckpt/Llama-3.2-1B", "ckpt/Qwen3-0.6B", "calib.txt",
                 "ckpt/DiT-XL-2-256", "pixart.kiln"):
        if name in block.text and name not in written:
            src, dst = files / name, here / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)


def _commands(block: Block) -> list[list[str]]:
    """The argv of each `kiln ...` line, optional [parts] included, comments dropped."""
    return [shlex.split(line.replace("[", " ").replace("]", " "), comments=True)[1:]
            for line in block.text.splitlines() if line.startswith("kiln ")]


# ----------------------------------------------------------------------------- the blocks


def _param(b: Block):
    marks = [] if b.marker is None else pytest.mark.gpu if b.marker == "needs a GPU" else pytest.mark.skip(reason=f"({b.marker})")
    return pytest.param(b, marks=marks, id=f"README.md:{b.line}-{b.lang}")


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_block_runs(block, stand_ins, request, tmp_path, monkeypatch, capsys):
    names, files = request.getfixturevalue("diffusion_stand_ins") if block.section == "Diffusion sampling" else stand_ins
    _prepare(block, files, tmp_path)
    monkeypatch.chdir(tmp_path)
    if block.lang == "python":
        namespace = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in names.items()}
        exec(compile(block.text, f"README.md:{block.line}", "exec"), namespace)
        return
    for argv in _commands(block):
        rc = main(argv)
        assert rc == 0, f"`kiln {shlex.join(argv)}` exited {rc}: {capsys.readouterr().err}"
