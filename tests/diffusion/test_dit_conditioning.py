"""kiln.diffusion.dit_conditioning: a DiT pipeline's modulation computed for 32 steps at a time by its own graph
(hoisted out of the step graph) samples the images of the step graph that computes it every step, past the table's
refreshes; the step graph holds none of the conditioning weights; the user's transformer is left as it was."""
import torch
from torch import nn

import kiln.diffusion
from kiln.diffusion import dit_conditioning as dc

from .conftest import tiny_dit_pipeline


def images(kp, steps, labels=(3, 999)):
    return kp(class_labels=list(labels), num_inference_steps=steps, guidance_scale=4.0, seed=2, output_type="pt").images


def test_hoisted_conditioning_matches_the_step_graphs_own_across_refreshes(dit):
    pipe, kp = dit("dpm")  # (DPM-Solver++: a state input too)
    plain = kiln.diffusion.DiTPipeline.from_diffusers(pipe, max_batch=4, hoist_conditioning=False)
    assert kp.conditioning is not None and plain.conditioning is None
    K = kp.spec["conditioning_steps"]
    assert K == dc.CONDITIONING_STEPS
    for steps in (3, K + 5, 2 * K + 1):  # one table; a refresh at step K; two refreshes
        assert float((images(kp, steps) - images(plain, steps)).abs().max()) <= 1e-6, steps
    # the refresh matters: it runs before steps 0 and K, and with the first table kept, steps K.. read the rows of
    # steps 0.. and the images differ
    real, starts, first = kp.conditioning, [], []

    def stale(timesteps, start, labels):
        starts.append(int(start))
        if not first:
            first.append(real(timesteps, start, labels).clone())
        return first[0]
    kp.conditioning = stale
    try:
        assert float((images(kp, K + 5) - images(plain, K + 5)).abs().max()) > 1e-3
    finally:
        kp.conditioning = real
    assert starts == [0, K]


def test_step_graph_holds_no_conditioning_weights(dit):
    pipe, kp = dit("ddim")
    plain = kiln.diffusion.DiTPipeline.from_diffusers(pipe, max_batch=4, hoist_conditioning=False)
    numel = lambda g: sum(t.numel() for t in g.weights.values())  # noqa: E731
    tr = pipe.transformer
    moved = sum(p.numel() for b in tr.transformer_blocks for p in b.norm1.linear.parameters())
    moved += sum(p.numel() for p in tr.proj_out_1.parameters())
    assert numel(kp.step.graph) <= numel(plain.step.graph) - moved
    hist = kp.step.graph.histogram()
    assert "EMBEDDING" not in hist and "SIN" not in hist  # no label lookup, no timestep embedding a step
    assert kp.conditioning.graph.histogram()["EMBEDDING"] >= 1


def test_conditioning_rows_are_diffusers_modulation():
    # row (step i, sample) of the table = what block b's AdaLayerNormZero and the output layer compute for t_i, label
    pipe = tiny_dit_pipeline("ddim")
    tr = pipe.transformer
    cond = dc.DiTConditioning(tr, 1000, steps=4)
    timesteps = torch.tensor([999, 800, 600, 400, 200, 0])
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        table = cond(timesteps, torch.tensor(3), labels)  # steps 3, 4, 5 and (clamped) 5
        assert table.shape == (4, 2, 2, dc.widths(tr)[0] * 2 + dc.widths(tr)[1])
        for k, i in enumerate([3, 4, 5, 5]):
            t, y = timesteps[i].expand(4), torch.tensor([3, 7, 1000, 1000])
            for b, block in enumerate(tr.transformer_blocks):
                want = block.norm1.linear(block.norm1.silu(block.norm1.emb(t, y, hidden_dtype=torch.float32)))
                w = want.shape[1]
                torch.testing.assert_close(table[k, :, :, b * w:(b + 1) * w].reshape(4, w), want)
            final = tr.proj_out_1(nn.functional.silu(tr.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=torch.float32)))
            torch.testing.assert_close(table[k, :, :, -final.shape[1]:].reshape(4, -1), final)


def test_view_leaves_the_transformer_as_it_was():
    pipe = tiny_dit_pipeline("ddim")
    tr = pipe.transformer
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([3, 1000])
    with torch.no_grad():
        before = tr(x, timestep=t, class_labels=y).sample
        view = dc.transformer_view(tr)
        row = dc.DiTConditioning(tr, 1000, steps=1)(t[:1], torch.tensor(0), y[:1])[0].reshape(2, -1)
        got = view(x, timestep=row, class_labels=None).sample
        after = tr(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(got, before)  # the view computes the transformer's output from the row
    assert torch.equal(after, before)
    assert type(tr.transformer_blocks[0].norm1).__name__ == "AdaLayerNormZero" and isinstance(tr.proj_out_1, nn.Linear)
    assert view.transformer_blocks[0].attn1 is tr.transformer_blocks[0].attn1  # weights shared, not copied


def test_non_dit_transformers_are_not_hoisted():
    pipe = tiny_dit_pipeline("ddim")
    assert dc.hoistable(pipe.transformer)
    assert not dc.hoistable(nn.Linear(2, 2))
    pipe.transformer.transformer_blocks[1].norm_type = "ada_norm"
    assert not dc.hoistable(pipe.transformer)


def test_artifacts_with_and_without_the_conditioning_graph(dit, tmp_path):
    # a hoisted pipeline saves its conditioning graph as a component; one saved without it (as before the hoisting)
    # still loads and samples with the step graph computing its own conditioning
    pipe, kp = dit("ddim")
    plain = kiln.diffusion.DiTPipeline.from_diffusers(pipe, max_batch=4, hoist_conditioning=False)
    hoisted = kiln.diffusion.load(kp.save(tmp_path / "hoisted.kiln"))
    old = kiln.diffusion.load(plain.save(tmp_path / "plain.kiln"))
    assert hoisted.conditioning is not None and old.conditioning is None
    want = images(kp, 4)
    assert float((images(hoisted, 4) - want).abs().max()) <= 1e-6
    assert float((images(old, 4) - want).abs().max()) <= 1e-6
