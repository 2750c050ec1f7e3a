"""The DeepSpeed backend's environment for its JIT-built ops (FusedAdam on a GPU).

Reference: DeepSpeed's own op builder (``compute_capability_args``), which the first GPU run
saw fail on an image whose ``TORCH_CUDA_ARCH_LIST`` names ``9.0a``."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # noqa: E402

from gigamim.train.engines.deepspeed import arch_list_for_deepspeed  # noqa: E402


def _deepspeed_parses(arch_list: str) -> None:
    builder = FusedAdamBuilder()
    builder.jit_mode = True  # the ranks' path: builder.load() -> jit_load()
    builder._jit_arch_list = arch_list
    builder.compute_capability_args()


@pytest.mark.parametrize("raw", ["9.0a", "8.0;9.0a+PTX", "9.0 9.0a", "10.0f;9.0a"])
def test_arch_suffixes_rewritten_to_what_deepspeed_builds(raw):
    with pytest.raises(ValueError):
        _deepspeed_parses(raw)  # the failure the GPU run hit, so the fix below is needed
    env = {"TORCH_CUDA_ARCH_LIST": raw}
    note = arch_list_for_deepspeed(env)
    assert note and raw in note
    _deepspeed_parses(env["TORCH_CUDA_ARCH_LIST"])
    assert "9.0" in env["TORCH_CUDA_ARCH_LIST"].split(";") or "9.0+PTX" in env["TORCH_CUDA_ARCH_LIST"]


@pytest.mark.parametrize("raw", ["9.0", "8.0;9.0+PTX", ""])
def test_plain_arch_lists_left_alone(raw):
    env = {"TORCH_CUDA_ARCH_LIST": raw}
    assert arch_list_for_deepspeed(env) is None and env["TORCH_CUDA_ARCH_LIST"] == raw
    if raw:
        _deepspeed_parses(raw)
