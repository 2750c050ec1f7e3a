"""``linear``: a Linear layer's ``x @ weight.T + bias``, shaped for whole-model ``torch.compile``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compiling_for_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is being traced into a compiled graph for the CPU (inductor's C++ backend):
    the graphs whose shape the model adapts (here and in the attention's q/k copy), measured on
    CPU only."""
    return torch.compiler.is_compiling() and x.device.type == "cpu"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; inside a compiled graph, the GEMM without the bias and the
    bias added after it (the same sum: the GEMM's result plus the bias, rounded once).

    Why: on CPU inductor runs a biased linear as ``addmm``, which first copies the broadcast
    bias into the output buffer and then has the GEMM read it back (beta=1): two passes over
    the output that do nothing else. Added after the GEMM of a 3-d or 4-d input (there is a
    view between the ``mm`` and the add, so inductor's mm + add -> addmm pattern does not
    match; a 2-d input, the small CPB MLP, is fused back into addmm), the bias is fused into
    the elementwise kernel that reads the GEMM output next (GELU, the res-post-norm, the
    cosine normalisation; the bias gradient is the same sum). Eager keeps the GEMM's own bias
    (one kernel; on GPUs a fused epilogue). The bias is cast to the GEMM's dtype as
    ``F.linear`` does under autocast (an fp32 bias would promote a bf16 output to fp32).
    Only for CPU graphs: that is where it was measured (cpu_compile_whole_2026-12-04_v2); on
    CUDA, addmm's bias is cuBLASLt's epilogue, and the GPU path stays as the GPU run measured it."""
    if bias is None or not compiling_for_cpu(x):
        return F.linear(x, weight, bias)
    out = F.linear(x, weight)
    return out + bias.to(out.dtype)
