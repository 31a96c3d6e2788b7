"""ir/interpret.py: constants are made on the device of the data, so a graph whose inputs and weights live on an
accelerator evaluates there (the oracle of the GPU tests, and calibration of a CUDA model: a constant left on the CPU
fails CUDA's device checks). The "meta" device stands in for CUDA on the CPU."""
import pytest
import torch

import kiln
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.ops import OPS
from kiln.passes.calibrate import observe_inputs


def constant_operand_graph() -> tuple[Graph, object]:
    """(c @ x^T) * w with c = reshape(float32(2.0), [1, 1]), and c itself as a second output."""
    g = Graph()
    x = g.add_input("x", (1, 3), "float32")
    w = g.add_weight("w", torch.full((1, 3), 0.5))
    c = g.add("RESHAPE", [g.add("CAST", [g.const(2.0)], dtype="float32")], shape=[1, 1])
    mm = g.add("MATMUL", [c, x])
    g.set_outputs([g.add("MUL", [mm, w]), c])
    return g, mm


def test_constants_follow_the_inputs_device():
    g, _ = constant_operand_graph()
    x = torch.arange(3.0).reshape(1, 3)
    y, c = interpret(g, [x])
    assert torch.equal(y, x) and c.device.type == "cpu"  # 2 * 0.5
    g.weights["w"] = g.weights["w"].to("meta")
    y, c = interpret(g, [x.to("meta")], compute_dtype=torch.float64)
    assert (y.device.type, c.device.type, y.dtype, y.shape) == ("meta", "meta", torch.float64, (1, 3))


def test_calibration_runs_on_the_weights_device():
    g, mm = constant_operand_graph()
    g.weights["w"] = g.weights["w"].to("meta")
    seen = []
    observe_inputs(g, {mm: seen.append}, [[torch.ones(1, 3)]])  # mm's first input: the constant
    assert [t.device.type for t in seen] == ["meta"]


@pytest.fixture
def same_device_refs(monkeypatch):
    """Every op's reference refuses tensors on two devices (the meta device, unlike CUDA, would mix with the CPU)."""
    def checked(ref):
        def run(args, attrs):
            devices = {t.device for t in args if isinstance(t, torch.Tensor) and t.dim() > 0}
            assert len(devices) <= 1, devices
            return ref(args, attrs)
        return run
    for name, op in list(OPS.items()):
        monkeypatch.setitem(OPS, name, op._replace(ref=checked(op.ref)))


@pytest.mark.parametrize("model", ["llama", "dit"])
def test_real_graphs_evaluate_on_one_device(pipeline_models, same_device_refs, model):
    # the decode step's position ids come from ARANGE / FULL nodes: without inputs, made on the data's device
    make, inputs, dims = pipeline_models[model]
    if model == "llama":
        graph = kiln.compile(make(), (inputs(2, 3),), dynamic=dims).graph
        feeds = [inputs(1, 1).to("meta")]
    else:
        graph = kiln.compile(make(), (), inputs(2), dynamic=dims).graph
        feeds = [t.to("meta") for t in inputs(1).values()]
    for name, w in graph.weights.items():
        graph.weights[name] = w.to("meta")
    out = interpret(graph, feeds, compute_dtype=torch.float64)
    assert all(o.device.type == "meta" for o in out)
    observe_inputs(graph, {}, [feeds])
