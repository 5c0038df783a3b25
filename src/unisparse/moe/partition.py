"""Expert partitioning: split a dense MLP's neurons into E equal experts (+ a shared expert).

SwiGLU and GELU MLPs separate over neurons (``down(silu(gate x) * up x)`` and ``down(gelu(up x + b))``
are sums of per-neuron terms, plus GELU's output bias once), so any
partition with all experts active at weight 1 reproduces the dense MLP exactly; the method only
decides which neurons sit together, i.e. what a top-k subset computes.

Methods:
  * ``snake`` (the paper): rank neurons by importance; the top ``shared_size`` form the shared
    expert; the rest are dealt in boustrophedon order (ranks 0..E-1 to experts 0..E-1, the next E
    to experts E-1..0, ...), so every expert gets one neuron of every band of E ranks and the
    experts' total importance is balanced.
  * ``contiguous``: blocks of consecutive neuron indices.
  * ``random``: a seeded permutation.
  * ``cluster``: balanced k-means of neurons by co-activation (LLaMA-MoE style), so neurons that
    fire together share an expert. The features are the rows of calibration's co-activation sketch
    C Omega (``Calibration.coactivation``): spherical k-means needs only the rows' cosines, which
    the random projection preserves, so the full [I, I] matrix C is never formed.
For every method the shared expert (if any) takes the top ``shared_size`` neurons by importance.
"""

from __future__ import annotations

import torch

from ..choices import PARTITION_METHODS
from ..models.moe_block import MoEMLP
from ..sizes import check_partition_sizes


def partition_neurons(
    importance, num_experts: int, shared_size: int = 0, method: str = "snake", seed: int = 0, coact=None
):
    """Assign each of the I neurons to the shared expert or to exactly one of E routed experts.

    importance: [I] score per neuron (higher = more important). coact (``cluster`` only): an [I, I]
    co-activation matrix or an [I, d] feature sketch; row j describes neuron j.
    Returns (shared_idx LongTensor [S], expert_idx LongTensor [E, I_e]), each row sorted ascending.
    """
    importance = torch.as_tensor(importance).detach().float().cpu()
    if importance.dim() != 1:
        raise ValueError(f"importance must be a 1-D tensor of per-neuron scores, got shape {tuple(importance.shape)}")
    width = importance.numel()
    expert_size = check_partition_sizes(width, num_experts, shared_size)
    if method not in PARTITION_METHODS:
        raise ValueError(f"unknown partition method {method!r}; expected one of {PARTITION_METHODS}")
    ranked = torch.argsort(importance, descending=True, stable=True)
    shared_idx, rest = ranked[:shared_size], ranked[shared_size:]
    if method == "snake":
        bands = rest.view(expert_size, num_experts).clone()
        bands[1::2] = bands[1::2].flip(1)
        experts = bands.t()
    elif method == "contiguous":
        experts = rest.sort().values.view(num_experts, expert_size)
    elif method == "random":
        g = torch.Generator().manual_seed(seed)
        experts = rest[torch.randperm(rest.numel(), generator=g)].view(num_experts, expert_size)
    else:
        if coact is None:
            raise ValueError("partition method 'cluster' needs coact (an [I, I] co-activation matrix or [I, d] sketch)")
        coact = torch.as_tensor(coact).detach().float().cpu()
        if coact.dim() != 2 or coact.shape[0] != width:
            raise ValueError(f"coact must have shape [{width}, d], got {tuple(coact.shape)}")
        labels = balanced_kmeans(coact[rest], num_experts, seed=seed)
        experts = torch.stack([rest[labels == e] for e in range(num_experts)])
    return shared_idx.sort().values, experts.sort(dim=1).values


def balanced_kmeans(features, num_clusters: int, seed: int = 0, iters: int = 20):
    """Spherical k-means whose clusters all get exactly n / num_clusters points.

    Assignment is a capacity-constrained greedy: in rounds, each unassigned point proposes to its most
    similar non-full cluster and each cluster accepts its most similar proposers up to capacity.
    Returns labels [n] (long).
    """
    n = features.shape[0]
    cap = n // num_clusters
    feats = features - features.mean(0, keepdim=True)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    centroids = feats[torch.randperm(n, generator=g)[:num_clusters]]
    labels = None
    for _ in range(iters):
        new = _capacity_assign(feats @ centroids.t(), cap)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, feats)
        centroids = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return labels


def _capacity_assign(scores, cap: int):
    n, k = scores.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), cap, dtype=torch.long)
    while True:
        free = torch.nonzero(labels < 0).squeeze(1)
        if free.numel() == 0:
            return labels
        s = scores[free].masked_fill(room[None] == 0, float("-inf"))
        best, choice = s.max(dim=1)
        for c in torch.unique(choice).tolist():
            mine = choice == c
            cand = free[mine][torch.argsort(best[mine], descending=True, stable=True)]
            take = cand[: int(room[c])]
            labels[take] = c
            room[c] -= take.numel()


def dense_to_moe(mlp, shared_idx, expert_idx, spec: dict) -> MoEMLP:
    """The MoE block holding exactly the dense MLP's weights (``MLPWeights`` or a dense block), split
    as given (see ``MoEMLP.from_dense``)."""
    return MoEMLP.from_dense(mlp, shared_idx, expert_idx, spec)
