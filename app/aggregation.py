"""Server-side aggregation of LoRA adapters: FedAvg and FlexLoRA (arXiv 2402.11505).

This is the one place where aggregation arithmetic lives, so that it can be tested
exactly against dense references without Flower, a GPU or a model in the loop.

FlexLoRA's server step is the best rank-r approximation of the weighted full-size
update dW = sum_k p_k B_k A_k. The reference implementations materialise dW (out x in)
for every module and run a full SVD on it; here dW is never formed. Since
dW = [p_1 B_1 ... p_K B_K] [A_1; ...; A_K] = Bs As has rank <= K r, thin QR factors of
the two stacked factors (Bs = Q1 R1, As^T = Q2 R2) reduce it to the SVD of the small
core R1 R2^T, which is exact and costs O((out + in) K r) memory instead of O(out in).
The QR and the core run in float64: in float32 on an H100 the result was 7e-4
(relative) away from the dense one, and float64 on factors this thin costs little.

Split of the singular values between B and A (`FLEXLORA_SPLITS`): B A is the same either way, but
the next round starts from these factors, and under Adam the step of B A depends on
their magnitudes, so the split changes what round k+1 learns. "reference" puts all of S
into B (B = U_r S_r, A = V_r^T), as the FlexLoRA reference code and the FlowerTune
benchmark strategy of the `use_flexlora` leaderboard submissions do
(yan-gao-GY/flowertune-benchmark, `FlexLoraLlm.distribute_weight_fast`): the default,
so that our FlexLoRA reproduces the seed's. "balanced" gives each factor sqrt(S_r)
(B^T B = A A^T = S_r); bench/flexlora_split/ compares the two.

FedAvg lives here too, although Flower ships one: ours accumulates in float64 (the
result does not depend on the clients' order), keeps each tensor's dtype and names the
keys a client disagrees on, and both aggregations then share one set of checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from app.config import FLEXLORA_SPLITS

__all__ = ["fedavg", "flexlora"]

_LORA_A = ".lora_A."
_LORA_B = ".lora_B."


def _normalised_weights(weights: Sequence[float], n_states: int) -> list[float]:
    """Turn example counts into probabilities, refusing anything a typo could cause.

    A zero or negative count would silently drop or invert a client's update, so it is
    an error rather than something to clamp.
    """
    if n_states == 0:
        raise ValueError("no states to aggregate")
    if len(weights) != n_states:
        raise ValueError(f"got {n_states} states but {len(weights)} weights")
    values = [float(w) for w in weights]
    bad = [w for w in values if not (math.isfinite(w) and w > 0.0)]
    if bad:
        raise ValueError(f"weights must be finite and positive, got {values}")
    total = math.fsum(values)
    return [w / total for w in values]


def _check_same_keys(states: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """Return the common key order, or say exactly which keys a client disagrees on.

    Averaging over the intersection would hide a client that trained a different
    adapter configuration; naming the keys makes that failure easy to diagnose.
    """
    keys = list(states[0].keys())
    reference = set(keys)
    for index, state in enumerate(states[1:], start=1):
        other = set(state.keys())
        if other != reference:
            missing = sorted(reference - other)
            extra = sorted(other - reference)
            raise ValueError(f"state {index} has different keys from state 0: missing {missing}, unexpected {extra}")
    return keys


def _average_tensors(key: str, tensors: Sequence[torch.Tensor], probs: Sequence[float]) -> torch.Tensor:
    """Accumulate in float64 so the result does not depend on the clients' order."""
    shape = tensors[0].shape
    for index, tensor in enumerate(tensors[1:], start=1):
        if tensor.shape != shape:
            raise ValueError(f"key {key!r}: state {index} has shape {tuple(tensor.shape)}, state 0 has {tuple(shape)}")
    acc = tensors[0].to(torch.float64) * probs[0]
    for tensor, prob in zip(tensors[1:], probs[1:]):
        acc.add_(tensor.to(device=acc.device, dtype=torch.float64), alpha=prob)
    return acc.to(tensors[0].dtype)


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: sum_k p_k t_k with p_k = w_k / sum(w), key by key.

    Weights are normally example counts, so a client's pull on the average matches how
    much data it saw. Output tensors keep the dtype (and device) of the first state.
    """
    probs = _normalised_weights(weights, len(states))
    keys = _check_same_keys(states)
    return {key: _average_tensors(key, [s[key] for s in states], probs) for key in keys}


@contextmanager
def _one_thread() -> Iterator[None]:
    """FlexLoRA makes ~2,500 small torch calls; with one thread per core on a host whose
    cores are busy training, each call waits for stalled threads: 4-7 s a round on a loaded
    32-core host against 0.1-0.2 s on one thread (bench/flexlora_aggregation/profile_flexlora.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lora_pairs(keys: Sequence[str]) -> dict[str, str]:
    """Map each lora_A key to its lora_B key; an unpaired factor is an error.

    Works for PEFT's saved names ("...q_proj.lora_A.weight") and for in-model names
    that carry the adapter ("...q_proj.lora_A.default.weight").
    """
    key_set = set(keys)
    pairs: dict[str, str] = {}
    for key in keys:
        if _LORA_A in key:
            head, _, tail = key.rpartition(_LORA_A)
            partner = f"{head}{_LORA_B}{tail}"
            if partner not in key_set:
                raise ValueError(f"{key!r} has no matching {partner!r}")
            pairs[key] = partner
        elif _LORA_B in key:
            head, _, tail = key.rpartition(_LORA_B)
            partner = f"{head}{_LORA_A}{tail}"
            if partner not in key_set:
                raise ValueError(f"{key!r} has no matching {partner!r}")
    return pairs


def _canonical_signs(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix each component's sign so the output does not depend on the LAPACK backend.

    SVD determines singular vectors only up to sign; flipping a column of B together
    with the matching row of A leaves B A unchanged. The rule: the largest-magnitude
    entry of every column of B is positive.
    """
    idx = b.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(b, 0, idx)).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return b * signs, a * signs.unsqueeze(1)


def _flexlora_pair(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    probs: Sequence[float],
    rank: int,
    split: str,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of sum_k p_k B_k A_k, computed from the factors alone."""
    a0, b0 = a_list[0], b_list[0]
    if a0.dim() != 2 or b0.dim() != 2:
        raise ValueError(f"{name}: FlexLoRA needs 2-D LoRA factors, got A {tuple(a0.shape)}")
    out_dim, in_dim = b0.shape[0], a0.shape[1]
    for k, (a, b) in enumerate(zip(a_list, b_list)):
        if a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{name}: client {k} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"not (r x {in_dim}) and ({out_dim} x r)"
            )
        if a.shape[0] != a0.shape[0]:
            # PEFT applies (alpha / r_k) B_k A_k, so mixing ranks would need each product
            # scaled by its own alpha / r_k; nothing in a deployment of one run config
            # can produce mixed ranks, so they are refused instead of silently mis-weighted.
            raise ValueError(
                f"{name}: client {k} has LoRA rank {a.shape[0]}, client 0 has {a0.shape[0]}: "
                "mixed ranks are not supported (PEFT scales each client's B A by alpha / r)"
            )

    f64 = torch.float64
    device = b0.device
    b_stack = torch.cat([b.to(device=device, dtype=f64) * p for b, p in zip(b_list, probs)], dim=1)
    a_stack_t = torch.cat([a.to(device=device, dtype=f64) for a in a_list], dim=0).T

    # Householder QR gives orthonormal Q even when the stack is rank-deficient, and the
    # reduced form caps the core at min(dim, K r) when K r exceeds out or in.
    q1, r1 = torch.linalg.qr(b_stack, mode="reduced")
    q2, r2 = torch.linalg.qr(a_stack_t, mode="reduced")
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)

    kept = min(rank, s.shape[0])
    b_scale = s[:kept] if split == "reference" else s[:kept].sqrt()
    a_scale = torch.ones_like(b_scale) if split == "reference" else b_scale
    b_new = q1 @ (u[:, :kept] * b_scale)
    a_new = (a_scale.unsqueeze(1) * vh[:kept]) @ q2.T
    b_new, a_new = _canonical_signs(b_new, a_new)

    if kept < rank:
        # Zero components keep every client's adapter shape fixed across rounds.
        b_new = torch.cat([b_new, b_new.new_zeros(out_dim, rank - kept)], dim=1)
        a_new = torch.cat([a_new, a_new.new_zeros(rank - kept, in_dim)], dim=0)
    return a_new.to(a0.dtype), b_new.to(b0.dtype)


def flexlora(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    split: str = "reference",
) -> dict[str, torch.Tensor]:
    """FlexLoRA aggregation of PEFT LoRA state dicts.

    Averaging A and B separately (FedAvg) does not average the updates B A the model
    actually applies; FlexLoRA averages those and re-factors the result, keeping the
    rank-`rank` truncation that is closest in Frobenius norm. Keys that are not LoRA
    factors (biases, modules_to_save) have no such structure and are FedAvg'd. Outputs
    keep each input key's dtype; B is always out x rank and A rank x in, zero-padded
    when the aggregate has lower rank.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if split not in FLEXLORA_SPLITS:
        raise ValueError(f"split must be one of {', '.join(FLEXLORA_SPLITS)}, got {split!r}")
    probs = _normalised_weights(weights, len(states))
    keys = _check_same_keys(states)
    pairs = _lora_pairs(keys)
    b_keys = set(pairs.values())

    result: dict[str, torch.Tensor] = {}
    with _one_thread():
        for key in keys:
            if key in pairs:
                b_key = pairs[key]
                a_new, b_new = _flexlora_pair(
                    [s[key] for s in states], [s[b_key] for s in states], probs, rank, split, key
                )
                result[key] = a_new
                result[b_key] = b_new
            elif key not in b_keys:
                result[key] = _average_tensors(key, [s[key] for s in states], probs)
    # Same key order as the input, so checkpoints and logs list modules in model order.
    return {key: result[key] for key in keys}
