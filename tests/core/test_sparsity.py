import math

import pytest
import torch

from surgeon_core.opcount import OpCounter
from surgeon_core.sparsity import (EXACT_COUNT_SAMPLE, QUANTILE_SAMPLE, BitMask, Dropped, Pruned,
                                   PrunedFixed, ShapeOnly, capacity_for, pack_bits, prune,
                                   sampling_margin, select_threshold, select_topk, unpack_bits)

from .allocations import peak_allocated_bytes, tensor_bytes


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_bits_round_trip(n):
    mask = torch.rand(n) > 0.4
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_bits(bits, n), mask)


def test_keep_one_fp32_is_lossless():
    t = torch.randn(4, 8, 5, 5)
    t[t < 0] = 0  # post-ReLU: zeros are free
    packed = prune(t, 1.0, value_dtype=torch.float32)
    assert torch.equal(packed.unpack(), t)
    assert packed.kept == int((t != 0).sum())


@pytest.mark.parametrize("keep", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_bytes_within_bitmask_plus_fp16_bound(keep):
    t = torch.randn(64, 16, 16, 16)
    packed = prune(t, keep, "topk", torch.float16)
    bound = math.ceil(t.numel() / 8) + keep * t.numel() * 2 + 16
    assert packed.nbytes <= bound
    assert packed.values.dtype == torch.float16


@pytest.mark.parametrize("keep", [0.02, 0.1, 0.25, 0.5, 0.8])
def test_threshold_keep_ratio_within_one_percent(keep):
    t = torch.randn(200, 32, 16, 16)
    actual = float(select_threshold(t.reshape(-1), keep).float().mean())
    assert abs(actual - keep) <= 0.01


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("keep", [0.02, 0.1, 0.5])
def test_each_form_samples_its_own_size_and_keeps_within_its_margin(keep, sync_free):
    """NOTE [Sample size]: the exact-count form selects from 8,192 values, the sync-free form
    from 32,768; either keeps ``keep`` of the elements to five standard errors of its sample."""
    t = torch.randn(64, 32, 32, 32)
    size = QUANTILE_SAMPLE if sync_free else EXACT_COUNT_SAMPLE
    packed = prune(t, keep, sync_free=sync_free)
    kept = packed.unpack() != 0
    assert torch.equal(kept.view(-1), select_threshold(t.view(-1), keep, size))
    assert abs(float(kept.float().mean()) - keep) <= sampling_margin(keep, size)


def test_topk_keeps_the_largest_magnitudes():
    t = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0])
    mask = select_topk(t, 0.34)  # round(0.34 * 6) = 2
    assert mask.tolist() == [False, True, False, True, False, False]
    restored = Pruned(t, mask, torch.float32).unpack()
    assert restored.tolist() == [0.0, -5.0, 0.0, 2.0, 0.0, 0.0]


def test_tiny_keep_uses_indices_and_costs_less_than_a_bitmask():
    t = torch.randn(100_000)
    packed = prune(t, 0.01, "topk")
    assert packed.indices is not None and packed.bits is None
    assert packed.nbytes < math.ceil(t.numel() / 8) + 0.01 * t.numel() * 2


def test_keep_zero_holds_nothing():
    t = torch.randn(3, 4)
    packed = prune(t, 0.0)
    assert isinstance(packed, Dropped) and packed.nbytes == 0
    assert torch.equal(packed.unpack(), torch.zeros(3, 4))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_keep_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="keep ratio"):
        prune(torch.randn(10), bad)


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="selection"):
        prune(torch.randn(10), 0.5, selection="random")


def test_nan_and_inf_still_pack():
    t = torch.randn(1000)
    t[3], t[10], t[20] = float("nan"), float("inf"), -float("inf")
    for selection in ("threshold", "topk"):
        out = prune(t, 0.5, selection).unpack()
        assert out.shape == t.shape
    assert torch.isnan(prune(t, 1.0, value_dtype=torch.float32).unpack()[3])


def test_fp16_overflow_keeps_original_precision():
    t = torch.tensor([1e6, 1.0, -2e5, 0.5])
    packed = prune(t, 1.0, value_dtype=torch.float16)
    assert packed.values.dtype == torch.float32
    assert torch.equal(packed.unpack(), t)


def test_relu_mask_gives_the_exact_relu_gradient():
    x = torch.randn(6, 7, requires_grad=True)
    grad = torch.randn(6, 7)
    y = torch.relu(x)
    expected = torch.autograd.grad(y, x, grad)[0]
    packed = BitMask(y.detach())
    assert packed.nbytes == math.ceil(42 / 8)
    assert torch.equal(torch.ops.aten.threshold_backward(grad, packed.unpack(), 0), expected)
    assert packed.unpack().dtype == torch.uint8   # a byte an element while backward reads it


def test_a_relu_mask_unpacks_in_one_operator():
    """Each element's bit ANDed out of its byte: positive where set (issue 15: launches)."""
    packed = BitMask(torch.relu(torch.randn(3, 5, 7)))
    packed.unpack()          # the bit values are built once
    with OpCounter() as ops:
        restored = packed.unpack()
    assert ops.kernels == 1 and restored.shape == (3, 5, 7)


def test_relu_mask_gives_the_exact_leaky_relu_gradient():
    x = torch.randn(6, 7, requires_grad=True)
    grad = torch.randn(6, 7)
    y = torch.nn.functional.leaky_relu(x, 0.1)
    expected = torch.autograd.grad(y, x, grad)[0]
    restored = BitMask(y.detach()).unpack()
    got = torch.ops.aten.leaky_relu_backward(grad, restored, 0.1, True)
    assert torch.equal(got, expected)


def test_hardtanh_mask_gives_the_exact_relu6_gradient():
    x = torch.randn(500) * 5
    grad = torch.randn(500)
    expected = torch.ops.aten.hardtanh_backward(grad, x, 0.0, 6.0)
    restored = BitMask(x, 0.0, 6.0).unpack()
    assert torch.equal(torch.ops.aten.hardtanh_backward(grad, restored, 0.0, 6.0), expected)


def test_shape_only_holds_nothing():
    packed = ShapeOnly(torch.randn(2, 3, 4, 4))
    assert packed.nbytes == 0 and packed.unpack().shape == (2, 3, 4, 4)


def test_sync_free_form_unpacks_like_the_exact_count_form():
    t = torch.randn(3, 5, 7, 11)
    mask = select_topk(t.reshape(-1), 0.2)
    fixed = PrunedFixed(t, mask, int(mask.sum()), torch.float32)
    assert torch.equal(fixed.unpack(), Pruned(t, mask, torch.float32).unpack())
    assert fixed.kept == int(mask.sum())


def test_sync_free_form_holds_its_capacity_and_a_bitmask():
    t = torch.randn(100_000)
    packed = prune(t, 0.25, "threshold", torch.float16, sync_free=True)
    capacity = capacity_for(t.numel(), 0.25, "threshold")
    assert packed.nbytes == math.ceil(t.numel() / 8) + 2 * (capacity + 1)   # and slot 0's zero
    assert abs(packed.kept / t.numel() - 0.25) <= 0.01


def test_sync_free_overflow_drops_values_and_their_mask_bits_together():
    t = torch.arange(1.0, 101.0)
    packed = PrunedFixed(t, torch.ones(100, dtype=torch.bool), 10, torch.float32)
    out = packed.unpack()
    assert packed.kept == 10 and torch.equal(out[:10], t[:10]) and not out[10:].any()


def test_sync_free_fp16_saturates_instead_of_overflowing():
    t = torch.tensor([1e6, 1.0, -2e5, 0.5])
    out = prune(t, 1.0, value_dtype=torch.float16, sync_free=True).unpack()
    assert torch.isfinite(out).all() and out[0] == 65504.0 and out[1] == 1.0


def test_the_threshold_is_four_operators_and_reads_the_same_positions_every_call():
    """NOTE [Fixed sample positions]: one gather from positions drawn once per size, where a
    fresh draw cost two operators more (issue 15: launches)."""
    t = torch.randn(4 * QUANTILE_SAMPLE)
    select_threshold(t, 0.3, EXACT_COUNT_SAMPLE)   # either sample size draws them for both
    with OpCounter() as ops:
        first = select_threshold(t, 0.3)
    assert ops.kernels == 4, ops.by_name
    assert torch.equal(first, select_threshold(t.clone(), 0.3))


def test_sample_positions_do_not_alias_with_a_power_of_two_layout():
    """Activations are often (batch, 2^a, 2^b, 2^b): a strided sample could read one column.
    A tensor whose last column alone is large keeps half of it, and only it, at keep 1/64."""
    t = torch.rand(128, 16, 32, 32)
    t[..., -1] += 10.0
    mask = select_threshold(t.reshape(-1), 1 / 64).view(t.shape)
    assert 0.45 < float(mask[..., -1].float().mean()) < 0.55 and not mask[..., :-1].any()


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.float32])
def test_the_sync_free_form_packs_and_unpacks_in_few_operators(value_dtype):
    """NOTE [Sync-free packing]: it was 15 operators to pack and 11 to unpack (issue 15)."""
    t = torch.randn(16, 8, 12, 12)
    mask = select_topk(t.reshape(-1), 0.4)
    with OpCounter() as packing:
        packed = PrunedFixed(t, mask, capacity_for(t.numel(), 0.4, "topk"), value_dtype)
    with OpCounter() as unpacking:
        restored = packed.unpack()
    fp16 = value_dtype == torch.float16
    assert packing.kernels <= 9 + 2 * fp16, packing.by_name     # a clamp and a cast for fp16
    assert unpacking.kernels <= 5 + fp16, unpacking.by_name
    assert torch.equal(restored, Pruned(t, mask, value_dtype).unpack())


@pytest.mark.parametrize("n", [64, 1003])
def test_packing_a_consumed_mask_forms_the_products_in_its_memory(n):
    """A mask the caller made for packing alone is multiplied in place: one mask-sized buffer
    less at the moment the step peaks (issue 15); the bits are the same."""
    mask = torch.rand(n) > 0.5
    expected = pack_bits(mask)
    with OpCounter() as ops:
        bits = pack_bits(mask.clone(), consume=True)
    assert torch.equal(bits, expected)
    assert ops.by_name["mul_"] == 1 and "mul" not in ops.by_name


@pytest.mark.parametrize("n", [100, (1 << 18) + 5, 3 * (1 << 18) - 1])
def test_kept_values_gathered_in_chunks_equal_boolean_indexing(n):
    t = torch.randn(n)
    mask = select_threshold(t, 0.4, EXACT_COUNT_SAMPLE)
    packed = prune(t, 0.4)
    assert isinstance(packed, Pruned) and packed.values.dtype == torch.float16
    assert torch.equal(packed.values, t[mask].half())
    assert torch.equal(packed.unpack(), torch.where(mask, t.half().float(), torch.zeros(())))


def test_the_exact_count_form_gathers_in_two_operators_a_chunk():
    """NOTE [Exact-count gather]: counting and range-checking every chunk on its own cost seven
    operators a chunk (1,718 a surgeon step at batch 200 on the CPU, 5.5x full backprop's)."""
    t = torch.randn(3 * (1 << 18) + 5)
    mask = select_threshold(t, 0.4)
    Pruned(t, mask, torch.float16)
    with OpCounter() as ops:
        packed = Pruned(t, mask, torch.float16)
    chunks = 4
    assert ops.by_name["index"] == chunks and ops.kernels <= 2 * chunks + 8, ops.by_name
    assert torch.equal(packed.values, t[mask].half())


def test_the_sync_free_form_counts_its_kept_values_after_the_capacity_cut():
    t = torch.arange(1.0, 101.0)
    assert int(PrunedFixed(t, t > 50, 30, torch.float32).kept_lazy()) == 30
    assert PrunedFixed(t, t > 90, 30, torch.float32).kept == 10
    assert PrunedFixed(t[:0], t[:0] > 0, 0, torch.float32).kept == 0


def test_an_overflowing_value_in_a_late_chunk_keeps_the_whole_tensor_in_fp32():
    t = torch.randn(3 * (1 << 18))
    t[-3] = 1e6
    packed = prune(t, 0.5)
    assert packed.values.dtype == torch.float32 and float(packed.values.max()) == 1e6
    assert torch.equal(packed.unpack()[-3], t[-3])


def test_pruning_on_the_cpu_holds_little_more_than_the_magnitude_at_once():
    """Boolean indexing listed the kept positions in int64 first (8 bytes per kept value, twice
    the tensor's own size at keep 0.5) beside fp32 values cast to fp16 afterwards: issue 15's
    forward peak. Now the magnitude (4 bytes per element) and the mask (1) are the most."""
    t = torch.randn(3_000_000)
    peak = peak_allocated_bytes(lambda: prune(t, 0.5))
    assert peak <= 1.3 * tensor_bytes(t), peak / tensor_bytes(t)


def test_the_sync_free_form_numbers_kept_values_in_one_int64_buffer():
    """The prefix sum (int64) was multiplied by the mask into a second int64 tensor of the
    whole tensor's size, 8 bytes an element more at the moment of packing (on the CPU 7 times
    the tensor's bytes in all, where the sum's cast copy of the mask adds 8 more)."""
    t = torch.randn(3_000_000)
    peak = peak_allocated_bytes(lambda: prune(t, 0.5, sync_free=True))
    assert peak <= 5.5 * tensor_bytes(t), peak / tensor_bytes(t)
