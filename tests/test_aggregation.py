"""Tests for app.aggregation: FedAvg values and FlexLoRA against a dense float64 SVD."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from app.aggregation import fedavg, flexlora

pytestmark = pytest.mark.unit

PREFIX = "base_model.model.model.layers.{layer}.self_attn.{proj}"


def a_key(layer: int = 0, proj: str = "q_proj") -> str:
    return PREFIX.format(layer=layer, proj=proj) + ".lora_A.weight"


def b_key(layer: int = 0, proj: str = "q_proj") -> str:
    return PREFIX.format(layer=layer, proj=proj) + ".lora_B.weight"


def make_states(
    n_clients: int,
    out_dim: int,
    in_dim: int,
    r: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    case: str = "random",
    ranks: list[int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Random LoRA states for one module; `case` makes them rank-deficient on purpose."""
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks or [r] * n_clients
    shared_a = torch.randn(r, in_dim, generator=gen, dtype=torch.float64)
    states = []
    for k in range(n_clients):
        a = torch.randn(ranks[k], in_dim, generator=gen, dtype=torch.float64)
        b = torch.randn(out_dim, ranks[k], generator=gen, dtype=torch.float64)
        if case == "shared_A":
            a = shared_a.clone()
        if case == "zero_B" and k == 0:
            b = torch.zeros_like(b)
        states.append({a_key(): a.to(dtype), b_key(): b.to(dtype)})
    return states


def example_counts(n_clients: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return [float(c) for c in torch.randint(10, 1000, (n_clients,), generator=gen)]


def dense_delta(states, weights, akey=None, bkey=None) -> torch.Tensor:
    """sum_k p_k B_k A_k formed densely in float64: the reference, never the method."""
    akey, bkey = akey or a_key(), bkey or b_key()
    total = math.fsum(weights)
    return sum((w / total) * (s[bkey].double() @ s[akey].double()) for s, w in zip(states, weights))


def dense_truncation(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], s[:rank]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def product(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return out[b_key()].double() @ out[a_key()].double()


# ----------------------------------------------------------------------------- FedAvg


def test_fedavg_uses_example_count_proportions():
    states = [
        {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.0, 4.0]])},
        {"x": torch.tensor([5.0, 6.0]), "y": torch.tensor([[8.0, 0.0]])},
    ]
    out = fedavg(states, [100, 300])  # p = 0.25, 0.75
    assert torch.equal(out["x"], torch.tensor([4.0, 5.0]))
    assert torch.equal(out["y"], torch.tensor([[6.0, 1.0]]))
    assert list(out) == ["x", "y"]


def test_fedavg_three_clients_exact():
    states = [{"w": torch.tensor([float(v)])} for v in (1, 2, 4)]
    # p = 1/8, 3/8, 4/8 -> 1/8 + 6/8 + 16/8 = 23/8
    out = fedavg(states, [1, 3, 4])
    assert out["w"].item() == 23 / 8


def test_fedavg_is_scale_invariant_in_weights():
    states = make_states(3, 16, 12, 4, seed=3)
    a = fedavg(states, [1, 2, 3])
    b = fedavg(states, [10, 20, 30])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fedavg_keeps_dtype(dtype):
    states = [{"w": torch.full((3,), 1.0, dtype=dtype)}, {"w": torch.full((3,), 3.0, dtype=dtype)}]
    out = fedavg(states, [1, 1])
    assert out["w"].dtype == dtype
    assert torch.equal(out["w"], torch.full((3,), 2.0, dtype=dtype))


def test_fedavg_mismatched_keys_name_the_keys():
    states = [{"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1), "c": torch.zeros(1)}]
    with pytest.raises(ValueError, match=r"missing \['b'\].*unexpected \['c'\]"):
        fedavg(states, [1, 1])


def test_fedavg_mismatched_shapes_raise():
    states = [{"a": torch.zeros(2)}, {"a": torch.zeros(3)}]
    with pytest.raises(ValueError, match="'a'"):
        fedavg(states, [1, 1])


@pytest.mark.parametrize("bad", [0, -1, -0.5, math.nan, math.inf])
def test_fedavg_rejects_non_positive_weights(bad):
    states = [{"a": torch.zeros(1)}, {"a": torch.ones(1)}]
    with pytest.raises(ValueError, match="positive"):
        fedavg(states, [1, bad])


def test_fedavg_rejects_wrong_weight_count_and_empty():
    with pytest.raises(ValueError):
        fedavg([{"a": torch.zeros(1)}], [1, 2])
    with pytest.raises(ValueError):
        fedavg([], [])


# --------------------------------------------------------------------------- FlexLoRA

SHAPES = [(64, 48), (48, 64), (96, 96)]
CASES = [(k, "random") for k in (1, 2, 20)] + [(k, case) for k in (2, 20) for case in ("shared_A", "zero_B")]


@pytest.mark.parametrize("out_dim,in_dim", SHAPES)
@pytest.mark.parametrize("n_clients,case", CASES)
def test_flexlora_equals_dense_truncation(out_dim, in_dim, n_clients, case):
    r = 8
    states = make_states(n_clients, out_dim, in_dim, r, seed=out_dim + n_clients, case=case)
    weights = example_counts(n_clients)
    out = flexlora(states, weights, rank=r)
    ref, _ = dense_truncation(dense_delta(states, weights), r)
    assert out[b_key()].shape == (out_dim, r)
    assert out[a_key()].shape == (r, in_dim)
    assert rel_err(product(out), ref) <= 1e-6


@pytest.mark.parametrize("n_clients", [2, 20])
def test_flexlora_float32_equals_dense_truncation(n_clients):
    r = 8
    states = make_states(n_clients, 96, 80, r, seed=5, dtype=torch.float32)
    weights = example_counts(n_clients)
    out = flexlora(states, weights, rank=r)
    assert out[a_key()].dtype == out[b_key()].dtype == torch.float32
    ref, _ = dense_truncation(dense_delta(states, weights), r)
    assert rel_err(product(out), ref) <= 1e-6


@pytest.mark.parametrize("rank", [2, 5])
def test_flexlora_lower_target_rank_equals_dense_truncation(rank):
    states = make_states(4, 70, 50, 8, seed=11)
    weights = example_counts(4)
    out = flexlora(states, weights, rank=rank)
    ref, _ = dense_truncation(dense_delta(states, weights), rank)
    assert out[b_key()].shape == (70, rank) and out[a_key()].shape == (rank, 50)
    assert rel_err(product(out), ref) <= 1e-6


def test_flexlora_weights_matter():
    states = make_states(2, 40, 30, 4, seed=2)
    heavy_first = product(flexlora(states, [9, 1], rank=8))
    heavy_second = product(flexlora(states, [1, 9], rank=8))
    torch.testing.assert_close(heavy_first, dense_delta(states, [9, 1]), rtol=0, atol=1e-10)
    assert rel_err(heavy_first, heavy_second) > 0.1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_flexlora_single_full_rank_client_is_reproduced(dtype, tol):
    states = make_states(1, 64, 48, 8, seed=9, dtype=dtype)
    out = flexlora(states, [123], rank=8)
    original = states[0][b_key()].double() @ states[0][a_key()].double()
    assert rel_err(product(out), original) <= tol


@pytest.mark.parametrize(
    "out_dim,in_dim,n_clients,r,rank",
    [
        (64, 48, 2, 4, 16),  # rank > K r: 8 real components, 8 zero ones
        (20, 12, 2, 8, 16),  # rank > K r > min(out, in)
        (10, 6, 20, 8, 8),  # K r = 160 far above min(out, in) = 6
    ],
)
def test_flexlora_pads_to_requested_rank(out_dim, in_dim, n_clients, r, rank):
    states = make_states(n_clients, out_dim, in_dim, r, seed=4)
    weights = example_counts(n_clients)
    out = flexlora(states, weights, rank=rank)
    b, a = out[b_key()], out[a_key()]
    assert b.shape == (out_dim, rank) and a.shape == (rank, in_dim)
    real = min(n_clients * r, out_dim, in_dim, rank)
    assert torch.count_nonzero(b[:, real:]) == 0
    assert torch.count_nonzero(a[real:]) == 0
    # Nothing was truncated away, so the product is the full weighted update.
    delta = dense_delta(states, weights)
    assert rel_err(product(out), delta) <= 1e-10


def test_flexlora_all_zero_update_gives_zero_factors():
    states = make_states(2, 16, 12, 4, seed=0)
    for s in states:
        s[b_key()].zero_()
    balanced = flexlora(states, [1, 1], rank=4, split="balanced")
    assert torch.count_nonzero(balanced[b_key()]) == 0
    assert torch.count_nonzero(balanced[a_key()]) == 0
    # The reference split keeps A = V^T orthonormal whatever S is, like PEFT's B = 0 start.
    out = flexlora(states, [1, 1], rank=4)
    assert torch.count_nonzero(out[b_key()]) == 0
    torch.testing.assert_close(out[a_key()] @ out[a_key()].T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert out[b_key()].shape == (16, 4) and out[a_key()].shape == (4, 12)


def test_flexlora_refuses_mixed_client_ranks():
    # PEFT scales each client's B A by alpha / r_k: stacking mixed ranks unscaled would mis-weight them.
    states = make_states(3, 60, 40, 8, seed=6, ranks=[2, 4, 8])
    with pytest.raises(ValueError, match="client 1 has LoRA rank 4, client 0 has 2: mixed ranks are not supported"):
        flexlora(states, example_counts(3), rank=8)


@pytest.mark.parametrize("n_clients", [1, 2, 20])
def test_flexlora_balanced_split_gives_each_factor_root_s(n_clients):
    r = 8
    states = make_states(n_clients, 96, 64, r, seed=n_clients)
    weights = example_counts(n_clients)
    out = flexlora(states, weights, rank=r, split="balanced")
    b, a = out[b_key()], out[a_key()]
    _, s_ref = dense_truncation(dense_delta(states, weights), r)
    scale = s_ref[0].item()
    torch.testing.assert_close(b.T @ b, torch.diag(s_ref), rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(a @ a.T, torch.diag(s_ref), rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("n_clients", [1, 2, 20])
def test_flexlora_reference_split_puts_s_into_b(n_clients):
    """The reference code's B = U_r S_r, A = V_r^T: A orthonormal rows, B^T B = S^2."""
    r = 8
    states = make_states(n_clients, 96, 64, r, seed=n_clients)
    weights = example_counts(n_clients)
    out = flexlora(states, weights, rank=r)  # the default split
    b, a = out[b_key()], out[a_key()]
    ref, s_ref = dense_truncation(dense_delta(states, weights), r)
    scale = s_ref[0].item()
    torch.testing.assert_close(a @ a.T, torch.eye(r, dtype=a.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(b.T @ b, torch.diag(s_ref**2), rtol=0, atol=1e-9 * scale**2)
    assert rel_err(product(out), ref) <= 1e-6
    balanced = flexlora(states, weights, rank=r, split="balanced")
    assert rel_err(product(balanced), product(out)) <= 1e-10


def test_flexlora_rejects_unknown_split():
    states = make_states(2, 16, 12, 4, seed=0)
    with pytest.raises(ValueError, match="split must be one of reference, balanced, got 'sqrt'"):
        flexlora(states, [1, 1], rank=4, split="sqrt")


def test_flexlora_sign_convention_is_deterministic():
    states = make_states(3, 50, 40, 4, seed=8)
    first = flexlora(states, [1, 2, 3], rank=4)
    second = flexlora(states, [1, 2, 3], rank=4)
    for key in first:
        assert torch.equal(first[key], second[key])
    b = first[b_key()]
    peak = b.gather(0, b.abs().argmax(dim=0, keepdim=True))
    assert bool((peak > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flexlora_output_shapes_and_dtypes(dtype):
    states = make_states(3, 48, 32, 8, seed=7, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for s in states:
        s["base_model.model.lm_head.modules_to_save.default.weight"] = torch.randn(5, 32, generator=gen).to(dtype)
        s[PREFIX.format(layer=0, proj="q_proj") + ".base_layer.bias"] = torch.randn(48, generator=gen).to(dtype)
    weights = [3, 1, 2]
    out = flexlora(states, weights, rank=8)
    assert list(out) == list(states[0])
    assert out[a_key()].shape == (8, 32) and out[b_key()].shape == (48, 8)
    for key, tensor in out.items():
        assert tensor.dtype == dtype, key
        assert tensor.shape == states[0][key].shape, key
    # Non-LoRA keys are plain FedAvg.
    averaged = fedavg([{k: v for k, v in s.items() if "lora_" not in k} for s in states], weights)
    for key, tensor in averaged.items():
        assert torch.equal(out[key], tensor), key
    if dtype == torch.bfloat16:
        ref, _ = dense_truncation(dense_delta(states, weights), 8)
        assert rel_err(product(out), ref) <= 2e-2  # bf16 keeps ~3 significant digits


def test_flexlora_pairs_adapter_named_keys_across_modules():
    gen = torch.Generator().manual_seed(1)
    names = [
        ("layers.0.q_proj", 32, 24),
        ("layers.0.v_proj", 16, 24),
        ("layers.1.q_proj", 32, 24),
    ]
    states = []
    for _ in range(2):
        s = {}
        for name, out_dim, in_dim in names:
            s[f"{name}.lora_A.default.weight"] = torch.randn(4, in_dim, generator=gen).double()
            s[f"{name}.lora_B.default.weight"] = torch.randn(out_dim, 4, generator=gen).double()
        states.append(s)
    out = flexlora(states, [1, 3], rank=4)
    for name, out_dim, in_dim in names:
        ak, bk = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
        ref, _ = dense_truncation(dense_delta(states, [1, 3], ak, bk), 4)
        got = out[bk].double() @ out[ak].double()
        assert got.shape == (out_dim, in_dim)
        assert rel_err(got, ref) <= 1e-6, name


def test_flexlora_rejects_bad_inputs():
    states = make_states(2, 8, 6, 2)
    with pytest.raises(ValueError, match="rank"):
        flexlora(states, [1, 1], rank=0)
    with pytest.raises(ValueError, match="positive"):
        flexlora(states, [1, 0], rank=2)
    unpaired = [{a_key(): s[a_key()]} for s in states]
    with pytest.raises(ValueError, match="lora_B"):
        flexlora(unpaired, [1, 1], rank=2)
    renamed = [states[0], {a_key(1): states[1][a_key()], b_key(1): states[1][b_key()]}]
    with pytest.raises(ValueError, match="layers.1"):
        flexlora(renamed, [1, 1], rank=2)


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch call produces while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(result)[0]:
            if isinstance(leaf, torch.Tensor):
                self.max_numel = max(self.max_numel, leaf.numel())
        return result


def test_flexlora_never_forms_an_out_by_in_matrix():
    out_dim, in_dim = 512, 384
    states = make_states(3, out_dim, in_dim, 4, seed=12)
    # The probe must see a dense product, or a pass below would mean nothing.
    with _LargestTensor() as probe:
        _ = states[0][b_key()] @ states[0][a_key()]
    assert probe.max_numel == out_dim * in_dim
    with _LargestTensor() as probe:
        flexlora(states, [1, 2, 3], rank=4)
    assert 0 < probe.max_numel <= out_dim * 3 * 4
