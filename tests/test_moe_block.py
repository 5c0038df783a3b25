"""MoE block: exact equivalence with the dense MLP it came from, routers, fast dispatch == reference
(forward and gradients, empty experts included), gradient flow, accounting and clear errors."""

import pytest
import torch
import torch.nn.functional as F

from unisparse.models.blocks import GELUMLP, MLPWeights, SwiGLUMLP
from unisparse.models.moe_block import DISPATCHES, MoEMLP, load_balancing_loss, make_moe_spec
from unisparse.moe.partition import dense_to_moe, partition_neurons

H, WIDTH = 16, 48


def _dense(seed=0, kind="swiglu"):
    torch.manual_seed(seed)
    mlp = SwiGLUMLP(H, WIDTH) if kind == "swiglu" else GELUMLP(H, WIDTH)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.3)
    return mlp


def _moe(mlp, E, k, shared=0, router="paper", dispatch="grouped", method="snake"):
    imp = torch.rand(WIDTH, generator=torch.Generator().manual_seed(5))
    s, e = partition_neurons(imp, E, shared_size=shared, method=method)
    spec = make_moe_spec([1], E, k, (WIDTH - shared) // E, shared, router, dispatch, activation=mlp.kind)
    return dense_to_moe(mlp, s, e, spec), s, e


def _x(n=40, seed=1):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def _masked_dense(mlp, x, neuron_scale):
    """Dense MLP with each token's neuron activations multiplied by ``neuron_scale`` [N, I]."""
    act = F.silu(x @ mlp.gate_proj.weight.t()) * (x @ mlp.up_proj.weight.t())
    return (act * neuron_scale) @ mlp.down_proj.weight.t()


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared", [0, 8])
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_all_experts_equal_dense(shared, dispatch, kind):
    mlp = _dense(kind=kind)
    moe, _, _ = _moe(mlp, E=4, k=4, shared=shared, dispatch=dispatch)
    x = _x()
    with torch.no_grad():
        assert torch.allclose(moe(x), mlp(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", [d for d in DISPATCHES if d != "loop"])
def test_gelu_experts_every_dispatch_matches_the_reference_with_gradients(dispatch):
    """Top-k of GELU experts (per-expert first-layer bias, output bias added once): every dispatch
    computes the reference's output and gradients."""
    mlp = _dense(kind="gelu")
    ref, _, _ = _moe(mlp, E=4, k=2, router="softmax", dispatch="loop")
    fast, _, _ = _moe(mlp, E=4, k=2, router="softmax", dispatch=dispatch)
    fast.load_state_dict(ref.state_dict())
    x = _x()
    outs = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        m.zero_grad()
        m(xi).square().sum().backward()
        outs.append((xi.grad, m.experts.up_bias.grad, m.experts.up_proj.grad, m.down_bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mlp_weights_select_and_module_round_trip():
    for kind in ("swiglu", "gelu"):
        mlp = _dense(kind=kind)
        idx = torch.tensor([3, 0, 7])
        narrow = MLPWeights.of(mlp).select(idx).module()
        x = _x()
        act = mlp(x, return_aux=True)[1]["act"][:, idx]
        down = mlp.down_proj.weight[:, idx]
        bias = mlp.down_proj.bias if kind == "gelu" else 0
        with torch.no_grad():
            torch.testing.assert_close(narrow(x), act @ down.t() + bias)


@pytest.mark.parametrize("shared", [0, 8])
def test_top_k_equals_dense_restricted_to_chosen_neurons(shared):
    mlp = _dense()
    E, k = 4, 2
    moe, s, e = _moe(mlp, E=E, k=k, shared=shared)
    x = _x()
    with torch.no_grad():
        # zero-init paper router: weight 1 on each chosen expert -> the union of their neurons
        y, aux = moe(x, return_aux=True)
        assert torch.equal(aux["expert_weights"], torch.ones_like(aux["expert_weights"]))
        mask = torch.zeros(x.shape[0], WIDTH)
        mask[:, s] = 1.0
        for n in range(x.shape[0]):
            mask[n, e[aux["expert_idx"][n]].reshape(-1)] = 1.0
        assert mask.sum(1).eq(shared + k * e.shape[1]).all()
        assert torch.allclose(y, _masked_dense(mlp, x, mask), atol=1e-5)
        # trained-looking router: each neuron scaled by (1 + logit of its expert), unchosen -> 0
        moe.gate.weight.normal_(0, 0.5)
        moe.shared_expert_gate is None or moe.shared_expert_gate.weight.normal_(0, 0.5)
        y, aux = moe(x, return_aux=True)
        assert len({tuple(r) for r in aux["expert_idx"].sort(1).values.tolist()}) > 1  # routing varies
        logits = x @ moe.gate.weight.t()
        scale = torch.zeros(x.shape[0], WIDTH)
        if shared:
            scale[:, s] = 1 + x @ moe.shared_expert_gate.weight.t()
        top = logits.topk(k, dim=1).indices
        for n in range(x.shape[0]):
            for j in top[n].tolist():
                scale[n, e[j]] = 1 + logits[n, j]
        assert torch.allclose(y, _masked_dense(mlp, x, scale), atol=1e-5)


def test_paper_router_at_init_is_sum_of_chosen_experts():
    moe = MoEMLP(H, make_moe_spec([0], 6, 3, 8))
    assert moe.gate.weight.abs().sum() == 0
    x = _x(20)
    with torch.no_grad():
        y, aux = moe(x, return_aux=True)
        for n in range(x.shape[0]):
            ref = sum(moe.experts.expert(j, x[n : n + 1]) for j in aux["expert_idx"][n].tolist())
            assert torch.allclose(y[n : n + 1], ref, atol=1e-6)


def _route_subset(moe, x, keep):
    """Make the router prefer ``keep`` experts strongly so the others receive no token."""
    with torch.no_grad():
        x[:, 0] = 3.0
        moe.gate.weight.normal_(0, 0.3)
        others = [j for j in range(moe.num_experts) if j not in keep]
        moe.gate.weight[others, 0] = -20.0


@pytest.mark.parametrize("router", ["paper", "softmax"])
@pytest.mark.parametrize("fast", ["grouped", "grouped_mm"])
def test_fast_dispatch_matches_reference_with_gradients(router, fast):
    E, k = 8, 2
    results = {}
    for dispatch in ("loop", fast):
        mlp = _dense()
        moe, _, _ = _moe(mlp, E=E, k=k, shared=8, router=router, dispatch=dispatch)
        x = _x(30)
        _route_subset(moe, x, keep=[1, 4, 6])
        with torch.no_grad():
            moe.shared_expert_gate.weight.normal_(0, 0.3)
        x.requires_grad_(True)
        y, aux = moe(x, return_aux=True)
        used = set(aux["expert_idx"].reshape(-1).tolist())
        assert used == {1, 4, 6}  # five experts are empty
        (y * torch.linspace(-1, 1, H)).sum().backward()
        results[dispatch] = [y.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]
    for a, b in zip(results["loop"], results[fast]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_paper_router_gradient_only_for_chosen_experts():
    mlp = _dense()
    moe, _, _ = _moe(mlp, E=8, k=2)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3)
    x = _x(3)  # at most 6 of 8 experts chosen
    y, aux = moe(x, return_aux=True)
    y.pow(2).sum().backward()
    chosen = set(aux["expert_idx"].reshape(-1).tolist())
    assert len(chosen) < 8
    for j in range(8):
        row = moe.gate.weight.grad[j]
        assert (row.abs().sum() > 0) == (j in chosen), j
        assert (moe.experts.down_proj.grad[j].abs().sum() > 0) == (j in chosen), j


def test_router_trains_in_expert_frozen_setting():
    """Zero-init router, frozen experts: the (1 + logit) factor still gives the router a gradient."""
    moe, _, _ = _moe(_dense(), E=4, k=2)
    moe.experts.requires_grad_(False)
    y = moe(_x(10))
    y.sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0 and moe.experts.gate_up_proj.grad is None


def test_softmax_router_weights_and_balance_loss():
    moe, _, _ = _moe(_dense(), E=4, k=2, router="softmax")
    assert moe.gate.weight.abs().sum() > 0  # N(0, 0.02) init, not zero
    y, aux = moe(_x(), return_aux=True)
    assert torch.allclose(aux["expert_weights"].sum(1), torch.ones(40), atol=1e-6)
    # balanced routing with uniform probabilities scores exactly 1, collapse scores higher
    E = 4
    idx = torch.arange(8).view(4, 2) % E
    assert torch.isclose(load_balancing_loss(torch.zeros(4, E), idx, E), torch.tensor(1.0))
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(4, 1)
    assert load_balancing_loss(logits, torch.tensor([[0, 1]]).repeat(4, 1), E) > 1.5
    loss = load_balancing_loss(aux["router_logits"], aux["expert_idx"], E)
    loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_active_fractions_and_model_integration():
    from helpers.models import make_model
    from unisparse.accounting import parameter_counts

    spec = make_moe_spec([1], num_experts=4, top_k=2, expert_size=16)
    model = make_model(moe={"gen": spec})
    mlp = model.mlp(1, "gen")
    assert isinstance(mlp, MoEMLP) and not isinstance(model.mlp(0, "gen"), MoEMLP)
    assert mlp.gate.weight.abs().sum() == 0  # the model's post_init keeps the paper router's zero init
    frac = mlp.active_parameter_fractions()
    assert frac["experts.gate_up_proj"] == frac["experts.down_proj"] == 0.5 and frac["gate.weight"] == 1.0
    assert set(frac) == {n for n, _ in mlp.named_parameters()}
    counts = parameter_counts(model)
    expert_params = mlp.experts.gate_up_proj.numel() + mlp.experts.down_proj.numel()
    assert counts["total"]["gen"] - counts["active"]["gen"] == expert_params // 2
    assert counts["total"]["und"] == counts["active"]["und"]


def test_bad_specs_are_clear():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(H, make_moe_spec([0], 4, 5, 8))
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(H, {"layers": [0], "num_experts": 4, "top_k": 0, "expert_size": 8})
    with pytest.raises(ValueError, match="router"):
        MoEMLP(H, make_moe_spec([0], 4, 2, 8, router="sigmoid"))
    with pytest.raises(ValueError, match="dispatch"):
        MoEMLP(H, make_moe_spec([0], 4, 2, 8, dispatch="fast"))
    s, e = partition_neurons(torch.rand(WIDTH), 4)
    with pytest.raises(ValueError, match="disagrees"):
        dense_to_moe(_dense(), s, e, make_moe_spec([0], 4, 2, 8))
