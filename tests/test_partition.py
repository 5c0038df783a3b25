"""Expert partitioning: every neuron placed once, snake dealing balanced, clustering groups
co-activated neurons, bad sizes rejected with clear messages."""

import pytest
import torch

from unisparse.moe.partition import PARTITION_METHODS, partition_neurons


def _coact(width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(width, 8, generator=g)


@pytest.mark.parametrize("method", PARTITION_METHODS)
@pytest.mark.parametrize("shared", [0, 8])
def test_every_neuron_exactly_once(method, shared):
    width, E = 72, 4
    imp = torch.rand(width, generator=torch.Generator().manual_seed(1))
    s, e = partition_neurons(imp, E, shared_size=shared, method=method, coact=_coact(width))
    assert s.dtype == e.dtype == torch.long
    assert s.shape == (shared,) and e.shape == (E, (width - shared) // E)
    assert sorted(torch.cat([s, e.reshape(-1)]).tolist()) == list(range(width))
    # deterministic order inside each expert; shared expert = top neurons by importance
    assert torch.equal(e, e.sort(dim=1).values)
    assert set(s.tolist()) == set(torch.topk(imp, shared).indices.tolist())


def test_snake_small_example():
    imp = torch.arange(8, 0, -1).float()  # neuron j has rank j
    _, e = partition_neurons(imp, 2, method="snake")
    assert e.tolist() == [[0, 3, 4, 7], [1, 2, 5, 6]]
    s, e = partition_neurons(imp, 3, shared_size=2, method="snake")
    assert s.tolist() == [0, 1] and e.tolist() == [[2, 7], [3, 6], [4, 5]]


def test_snake_one_neuron_per_band_and_balanced():
    width, E, shared = 1040, 16, 16
    imp = torch.rand(width, generator=torch.Generator().manual_seed(0))
    s, e = partition_neurons(imp, E, shared_size=shared, method="snake")
    rank = torch.empty(width, dtype=torch.long)
    rank[torch.argsort(imp, descending=True)] = torch.arange(width)
    band = (rank[e] - shared) // E  # [E, I_e] band of each neuron
    for row in band:
        assert sorted(row.tolist()) == list(range(width // E - 1))
    sums = imp[e].sum(1)
    assert sums.max() / sums.min() < 1.01
    # dealing matters: a random split of the same neurons is clearly less balanced
    _, r = partition_neurons(imp, E, shared_size=shared, method="random")
    rs = imp[r].sum(1)
    assert rs.max() / rs.min() > sums.max() / sums.min()


def test_contiguous_and_random():
    imp = torch.rand(24)
    _, e = partition_neurons(imp, 3, method="contiguous")
    assert e.tolist() == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    _, a = partition_neurons(imp, 3, method="random", seed=1)
    _, b = partition_neurons(imp, 3, method="random", seed=1)
    _, c = partition_neurons(imp, 3, method="random", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cluster_recovers_planted_groups():
    E, per, d = 4, 12, 16
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(E, d, generator=g) * 3
    truth = torch.arange(E).repeat_interleave(per)
    perm = torch.randperm(E * per, generator=g)
    truth = truth[perm]
    feats = centres[truth] + 0.3 * torch.randn(E * per, d, generator=g)
    for coact in (feats, feats @ feats.t()):  # [I, d] sketch or [I, I] co-activation matrix
        _, e = partition_neurons(torch.rand(E * per), E, method="cluster", coact=coact)
        groups = sorted(tuple(truth[row].tolist()) for row in e)
        assert all(len(set(gr)) == 1 for gr in groups), groups


def test_bad_sizes_are_clear():
    imp = torch.rand(30)
    with pytest.raises(ValueError, match="does not divide"):
        partition_neurons(imp, 4)
    with pytest.raises(ValueError, match="does not divide"):
        partition_neurons(imp, 5, shared_size=3)
    with pytest.raises(ValueError, match="num_experts"):
        partition_neurons(imp, 0)
    with pytest.raises(ValueError, match="shared_size"):
        partition_neurons(imp, 5, shared_size=-5)
    with pytest.raises(ValueError, match="shared_size"):
        partition_neurons(imp, 1, shared_size=30)
    with pytest.raises(ValueError, match="unknown partition method"):
        partition_neurons(imp, 5, method="kmeans")
    with pytest.raises(ValueError, match="needs coact"):
        partition_neurons(imp, 5, method="cluster")
