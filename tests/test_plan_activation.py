"""`gigamim plan`'s activation memory per image against the CUDA path, measured without a GPU.

The reference is a measurement, not the planner's arithmetic: `benchmarks/activation_memory.py`
runs the SimMIM forward on fake CUDA tensors (FakeTensorMode, bf16 weights and inputs: the CUDA
path's shapes, dtypes and kernel dispatch) under torch's MemTracker, and the forward + backward on
the meta device (where the autograd engine runs) for the high-water with checkpointing's
recompute. Per image = the slope between two micro-batch sizes. The planner must be within
+-15%: its saved bytes, its largest block (the recompute set), and the per-image figure
`gigamim plan` fits micro-batches with. SwinV2-B in the default run (~1 min); every size and
setting under `-m slow` (~1 h on 2 shared cores; the same rows as
benchmarks/results/activation_memory_2026-12-04).
"""

from __future__ import annotations

import pytest

from gigamim_benchmarks import activation_memory as am

TOL = 0.15


def _within(row: dict, key: str) -> None:
    ratio = row.get(key)
    assert ratio is not None, f"{row['model']} {row['setting']}: no {key}"
    assert abs(ratio - 1) <= TOL, (
        f"{row['model']} {row['setting']}: planner / measured {key} = {ratio:.3f} (outside +-{TOL:.0%}); "
        + ", ".join(f"{k} {row[k]:.2f}" for k in row if k.endswith("_mib") and row[k] is not None))


def test_base_forward_saved_matches_plan():
    # Fake-CUDA forward, bf16: what autograd keeps at the end of the forward is the whole
    # activation memory without checkpointing; `gigamim plan`'s per-image figure must match it.
    row = am.score(am.measure("B", "explicit", batches=(1, 2), backward=False, block=False))
    assert row["hooks_mib"] == pytest.approx(row["saved_mib"], rel=0.02)  # two mechanisms, one count
    _within(row, "ratio_saved")
    _within(row, "ratio_plan")


def test_base_checkpointed_peak_matches_plan():
    # With checkpointing the forward keeps only the block inputs; the per-image figure is the
    # backward's high-water: one block recomputed whole plus the gradients in flight through it.
    # It grows with the micro-batch (measured slope over 64 -> 128 images).
    row = am.score(am.measure("B", "explicit+ckpt", batches=(64, 128)))
    _within(row, "ratio_saved")
    _within(row, "ratio_block")
    _within(row, "ratio_plan")
    assert row["peak_mib"] > 2 * row["saved_mib"]  # the recompute is per-image memory, not a constant


SLOW = [(m, s) for m in am.MODELS for s in am.SETTINGS
        if (m, s) not in {("B", "explicit+ckpt")}]


@pytest.mark.slow
@pytest.mark.parametrize("model,setting", SLOW, ids=[f"{m}-{s}" for m, s in SLOW])
def test_activation_per_image_matches_plan(model, setting):
    row = am.score(am.measure(model, setting, batches=(64, 128)))
    _within(row, "ratio_saved")
    _within(row, "ratio_plan")
    if "ratio_block" in row:
        _within(row, "ratio_block")
