"""torch.compile(fullgraph=True) of a whole DANet forward + backward on CPU: the fused neuron is a registered
custom op (one graph node per neuron, no graph break) and the compiled step equals eager. ``aot_eager`` traces
exactly what inductor would be given (dynamo + AOTAutograd's joint graph) without inductor's C++ compile, which
takes minutes on 2 cores (BENCHMARKS.md has an inductor run)."""

from __future__ import annotations

import copy

import pytest
import torch

from models import create_model

torch.set_num_threads(2)


def _recording_backend(graphs: list):
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def _step(model, x, y):
    out = model(x)
    torch.nn.functional.cross_entropy(out.mean(0), y).backward()
    return out.detach()


def _compare(policy: str, channels_last: bool) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = create_model("danet18", T=2, num_classes=10, width=4, input_size=32, checkpointing=policy)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    if policy == "auto":  # probed eagerly, before compiling (no memory limit on CPU: none)
        assert eager.resolve_checkpointing(x) == "none"
    compiled = copy.deepcopy(eager)
    if channels_last:
        eager, compiled = (m.to(memory_format=torch.channels_last) for m in (eager, compiled))
        x = x.contiguous(memory_format=torch.channels_last)
    graphs: list = []
    fn = torch.compile(compiled, fullgraph=True, backend=_recording_backend(graphs))  # raises on any graph break
    out_e, out_c = _step(eager, x, y), _step(fn, x, y)

    assert len(graphs) == 1, f"{len(graphs)} graphs"
    # checkpointed segments are subgraphs (submodules of the graph module): count their nodes too
    nodes = [n for g in graphs[0].modules() if isinstance(g, torch.fx.GraphModule) for n in g.graph.nodes]
    lif_nodes = [n for n in nodes if str(n.target).startswith("danet.lif_forward")]
    neurons = sum(1 for m in eager.modules() if type(m).__name__ == "MultiStepNeuron")
    assert len(lif_nodes) == neurons > 0  # every neuron is one opaque op in the graph
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert b.grad is not None, name
        rel = ((a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-30)).item()
        assert rel <= 1e-5, f"{name}: rel err {rel:.2e}"
    for (name, a), b in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        # BatchNorm running statistics updated once, as in eager: to rounding, as eager's CPU BatchNorm (the
        # C++ kernel, models/_cpu_kernels.py) sums in another order than the traced torch op; a second update
        # would move them by the momentum, orders of magnitude more
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8, msg=name)


def test_danet_compiles_fullgraph_and_matches_eager():
    """checkpointing=auto resolved before compiling (to none here, as on any host with room), channels_last:
    the fake kernels must give the real kernels' strides, or the compiled graph would misread the outputs."""
    _compare("auto", channels_last=True)


def test_checkpointed_danet_compiles_fullgraph():
    """checkpointing=time: segments recomputed in the compiled backward, running statistics updated once."""
    _compare("time", channels_last=False)


def test_unresolved_auto_policy_is_refused_under_fullgraph():
    """The auto probe runs outside the graph (torch.compiler.disable): fullgraph refuses it at once, not traced."""
    torch._dynamo.reset()
    m = create_model("danet18", T=2, num_classes=10, width=4, input_size=32, checkpointing="auto")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="skipped"):
        torch.compile(m, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 32, 32))
    assert m.checkpointing_resolved is None


@pytest.mark.parametrize("decay_input", [True, False])
def test_plif_compiles_fullgraph_with_its_rate_gradient(decay_input):
    """PLIF's learnable rate goes into the registered op as a tensor (``sigmoid(w)`` traced beside it): one graph,
    one ``danet::lif_forward`` node, and the compiled gradients of x, the initial membrane and w equal eager's."""
    from models import MultiStepNeuron, NeuronSpec

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MultiStepNeuron(NeuronSpec(type="plif", decay_input=decay_input, v_reset=0.2))
    eager.w.data.fill_(0.4)
    compiled = copy.deepcopy(eager)
    x = (torch.randn(4, 2, 3, 5, 5) * 1.5 + 0.6).contiguous()
    v0, g = torch.rand(2, 3, 5, 5) * 0.5, torch.randn(4, 2, 3, 5, 5)
    graphs: list = []
    fn = torch.compile(compiled.forward_with_state, fullgraph=True, backend=_recording_backend(graphs))
    results = []
    for call, module in ((eager.forward_with_state, eager), (fn, compiled)):
        xb, vb = x.clone().requires_grad_(), v0.clone().requires_grad_()
        spikes, v_last = call(xb, vb)
        ((spikes * g).sum() + v_last.square().sum()).backward()
        results.append((spikes, v_last, xb.grad, vb.grad, module.w.grad))
    assert len(graphs) == 1
    assert sum(str(n.target).startswith("danet.lif_forward") for n in graphs[0].graph.nodes) == 1
    assert 0.05 < results[0][0].mean() < 0.95
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
