"""KILN_L2_BRANCH (codegen/kernels/l2_branch.py, runtime/kernel_calls.with_l2_branch): before each decode attention a
call forks a second stream and asks the L2 there for the stored tensors of the GEMMs after it. CPU: the variable's
parsing, the pieces (alignment, budget, a tensor met twice), where the branches go, the prefetch kernel under the
interpreter (its asm skipped); GPU: a generator's plans with the branch capture and give the tokens of those without."""
import pytest
import torch

from kiln.codegen.kernels import l2_branch
from kiln.runtime.kernel_calls import KernelCall, branch_points, with_l2_branch

pytestmark = pytest.mark.interpreter


def test_setting(monkeypatch):
    monkeypatch.delenv(l2_branch.ENV, raising=False)
    assert l2_branch.setting() == (0, l2_branch.PROGRAMS)
    for value, want in (("0", (0, l2_branch.PROGRAMS)), ("24", (24 << 20, l2_branch.PROGRAMS)), ("8:4", (8 << 20, 4))):
        monkeypatch.setenv(l2_branch.ENV, value)
        assert l2_branch.setting() == want
    for bad in ("1.5", "x", "8:", "8:0", "-1"):
        monkeypatch.setenv(l2_branch.ENV, bad)
        with pytest.raises(ValueError, match="KILN_L2_BRANCH"):
            l2_branch.setting()


def test_pieces_aligned_within_budget_each_tensor_once():
    a = torch.zeros(1000, dtype=torch.uint8)  # 1000 bytes: 992 asked for (a multiple of 16)
    b = torch.zeros(100, dtype=torch.float32)  # 400 bytes
    odd = torch.zeros(64, dtype=torch.uint8)[1:]  # off a 16-byte boundary: left out
    strided = torch.zeros(8, 8)[:, 0]
    got = l2_branch.pieces([a, odd, strided, b, a], 1 << 20, chunk=256)
    assert got == [(a.data_ptr() + o, s) for o, s in ((0, 256), (256, 256), (512, 256), (768, 224))] + [
        (b.data_ptr(), 256), (b.data_ptr() + 256, 144)]
    assert all(p % 16 == 0 and s % 16 == 0 and 0 < s <= 256 for p, s in got)
    capped = l2_branch.pieces([a, b], 600, chunk=256)  # the budget reached inside a
    assert capped == [(a.data_ptr(), 256), (a.data_ptr() + 256, 256), (a.data_ptr() + 512, 80)]
    assert l2_branch.pieces([a, b], 1000, chunk=4096) == [(a.data_ptr(), 992)]  # (8 bytes left: under 16)


def test_branch_points_before_decode_attentions_up_to_the_next():
    w = {name: torch.zeros(64, dtype=torch.uint8) for name in ("qkv", "o", "up", "down", "qkv2", "head")}

    def call(kind, name="", choice=""):
        return KernelCall(None, kind, lambda: None, choice or name)
    calls = [call("gemm", "qkv"), call("attention", choice="decode"), call("gemm", "o"), call("gemm", "up"),
             call("pointwise"), call("gemm", "down"), call("gemm", "qkv2"), call("attention", choice="decode"),
             call("gemm", "head"), call("attention", choice="prefill")]  # (a prefill attention: no branch)
    stored = {id(c): [w[c.choice]] for c in calls if c.kind == "gemm"}

    def tensors(c):
        return stored.get(id(c), [])

    def decode(c):
        return c.choice == "decode"
    points = branch_points(calls, tensors, decode, 1 << 20)
    assert [k for k, _ in points] == [1, 7]
    assert [p for p, _ in points[0][1]] == [w[n].data_ptr() for n in ("o", "up", "down", "qkv2")]
    assert [p for p, _ in points[1][1]] == [w["head"].data_ptr()]
    assert [p for p, _ in branch_points(calls, tensors, decode, 100)[0][1]] == [w["o"].data_ptr(), w["up"].data_ptr()]  # 64 + 36
    assert with_l2_branch(calls, {}, {}, torch.device("cpu")) == calls  # (CPU: no streams, the calls as they were)


def test_prefetch_kernel_runs_and_changes_nothing():
    # under the interpreter the prefetch instruction is skipped: the kernel walks its table and writes nothing
    ts = [torch.arange(4096, dtype=torch.int32), torch.ones(300, dtype=torch.float16)]
    before = [t.clone() for t in ts]
    p = l2_branch.Prefetch(l2_branch.pieces(ts, 1 << 20, chunk=1024), torch.device("cpu"), programs=3)
    assert p.n == 16 + 1 and p.nbytes == 4096 * 4 + 592 and p.programs == 1
    p()
    l2_branch.Prefetch([], torch.device("cpu"))()  # (nothing to ask for: no launch)
    assert all(torch.equal(a, b) for a, b in zip(ts, before))


@pytest.mark.gpu
def test_gpu_l2_branch_plans_capture_and_give_the_same_tokens(cuda_llama_generator, monkeypatch):
    gen = cuda_llama_generator
    prompt = [[1, 2, 3, 4, 5]]
    monkeypatch.delenv(l2_branch.ENV, raising=False)
    want = gen().generate(prompt, max_new_tokens=6).tokens
    monkeypatch.setenv(l2_branch.ENV, "1:2")
    g = gen()
    assert g.generate(prompt, max_new_tokens=6).tokens == want
    plans = g.compiled.executor.plans
    assert all(p.stats.cuda_graph for p in plans)
    branched = [c for p in plans for c in p.calls if c.kind == "prefetch"]
    assert any(c.choice.startswith("l2-branch:") for c in branched) and any(c.choice == "l2-branch-join" for c in branched)
