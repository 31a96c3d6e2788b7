"""Pipeline artifacts and the CLI: a pipeline saved as one .kiln samples the same images in a fresh process with
diffusers unimportable; ``kiln compile --pipeline`` and ``kiln sample`` write PNGs; refusals are one-line errors."""
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

import kiln
import kiln.diffusion
from kiln.cli import main

FRESH = """
import sys
sys.modules["diffusers"] = None  # any import of diffusers now fails
import kiln.diffusion
from safetensors.torch import save_file
kp = kiln.diffusion.load(sys.argv[1])
call = {{"class_labels": [3, 8]}} if kp.KIND == "dit" else {{"prompt": ["w1 w2", "W7"]}}
save_file({{"images": kp(**call, num_inference_steps=4, seed=9, output_type="pt").images,
           "kind": __import__("torch").tensor([kp.KIND == "dit"])}}, sys.argv[2])
"""


@pytest.mark.parametrize("which", ["dit", "pixart"])
def test_round_trip_in_a_fresh_process_without_diffusers(dit, pixart, which, tmp_path):
    _, kp = dit("dpm") if which == "dit" else pixart("dpm")
    path = kp.save(tmp_path / f"{which}.kiln")
    call = dict(class_labels=[3, 8]) if which == "dit" else dict(prompt=["w1 w2", "W7"])
    want = kp(**call, num_inference_steps=4, seed=9, output_type="pt").images
    subprocess.run([sys.executable, "-c", FRESH.format(), str(path), str(tmp_path / "out.safetensors")], check=True, cwd=tmp_path)
    got = load_file(tmp_path / "out.safetensors")
    assert torch.equal(got["images"], want) and bool(got["kind"]) == (which == "dit")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    parts = ("step", "vae") + (("text_encoder",) if which == "pixart" else ())
    assert {f"components/{p}/graph.json" for p in parts} <= names
    assert any(n.startswith("files/tokenizer/") for n in names) == (which == "pixart")


def test_wrong_files_are_refused(dit, pixart, tmp_path):
    _, kp = dit("ddim")
    path = kp.save(tmp_path / "dit.kiln")
    with pytest.raises(kiln.ArtifactError, match="holds a 'dit' pipeline, not 'pixart'"):
        kiln.diffusion.PixArtPipeline.load(path)
    with pytest.raises(kiln.ArtifactError, match="holds several graphs"):
        kiln.load(path)
    plain = kp.vae.save(tmp_path / "vae.kiln")  # one graph, no pipeline spec
    with pytest.raises(kiln.ArtifactError, match="not a diffusion pipeline"):
        kiln.diffusion.load(plain)
    with pytest.raises(kiln.KilnError, match="already exists"):
        kp.save(path)


def test_cli_compile_pipeline_and_sample(tmp_path, capsys):
    """``kiln compile --model dit-tiny --pipeline`` (random weights, up to 2 images per call) and ``kiln sample`` (one PNG
    per image, the pipeline's own pixels); a bad call is one line with a hint and exit status 1."""
    from PIL import Image

    art = str(tmp_path / "dit.kiln")
    assert main(["compile", "--model", "dit-tiny", "--pipeline", "--dim", "batch=1:2", "-o", art, "-q"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # (rich wraps the line at the terminal's width)
    assert "a dit sampling pipeline (step, vae, conditioning; DDIMScheduler, float32)" in out
    png = str(tmp_path / "out.png")
    assert main(["sample", art, "--class", "3", "--class", "9", "--steps", "3", "--guidance", "2", "--seed", "1", "-o", png]) == 0
    assert "wrote" in capsys.readouterr().out
    want = kiln.diffusion.load(art)(class_labels=[3, 9], num_inference_steps=3, guidance_scale=2.0, seed=1).images
    for i, image in enumerate(want):
        got = Image.open(tmp_path / f"out-{i}.png")
        assert got.size == (32, 32) and got.mode == "RGB" and got.tobytes() == image.tobytes()
    for argv, message in [
        (["sample", art, "--prompt", "a cat"], "is a class-conditional DiT pipeline: give --class N (ints in [0, 9]), not --prompt"),
        (["sample", art], "give --class N (ints in [0, 9])\n"),  # (nothing given: no "not --prompt")
        (["sample", art, "--class", "10", "-o", str(tmp_path / "x.png")], "class label 10 is not a class of this model"),
        (["sample", art, "--class", "1", "--steps", "0", "-o", str(tmp_path / "x.png")], "num_inference_steps=0"),
        (["sample", art, "--class", "1", "--class", "2", "--class", "3", "-o", str(tmp_path / "x.png")],
         "3 images in one call; this pipeline was compiled for 1 to 2"),
        (["sample", art, "--class", "3", "-o", str(tmp_path / "out-0.png")], "already exists"),
        (["sample", str(tmp_path / "absent.kiln"), "--class", "3"], "no such file"),
        (["compile", "--pipeline", "--model", "llama-tiny", "-o", str(tmp_path / "l.kiln")], "--pipeline builds dit-tiny"),
        (["compile", "--pipeline", "--model", "dit-tiny", "--kv-cache", "int8", "-o", str(tmp_path / "q.kiln")],
         "--kv-cache does not apply to --pipeline"),
        (["compile", "--pipeline", "--model", "dit-tiny", "-o", art], "already exists"),
        (["compile", "--pipeline", "--model", "dit-tiny", "-o", str(tmp_path / "missing" / "p.kiln")], "does not exist"),
    ]:
        assert main(argv) == 1, argv
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, (argv, error)


def test_preset_embedders_tied_and_computed_once():
    # a built-in DiT pipeline's random transformer holds one timestep / class embedder in every block, as converted
    # checkpoints do (presets.tie_embedders); kiln's CSE then looks the label up and runs the timestep MLP once a step
    from kiln.diffusion import presets

    pipe = presets.diffusers_pipeline("dit-tiny")
    blocks = pipe.transformer.transformer_blocks
    assert len(blocks) > 1
    for block in blocks[1:]:
        for (name, a), b in zip(blocks[0].norm1.emb.state_dict().items(), block.norm1.emb.state_dict().values()):
            assert torch.equal(a, b), name
    hoisted = kiln.diffusion.DiTPipeline.from_diffusers(pipe, max_batch=1)  # (the conditioning graph has them)
    assert hoisted.conditioning.graph.histogram()["EMBEDDING"] == 1 and "EMBEDDING" not in hoisted.step.graph.histogram()
    kp = kiln.diffusion.DiTPipeline.from_diffusers(pipe, max_batch=1, hoist_conditioning=False)
    assert kp.step.graph.histogram()["EMBEDDING"] == 1
