"""A Conv2d whose kernel equals its stride (a patchify, or a 1x1 conv), computed as one GEMM.

Such a convolution reads every input pixel exactly once: it is a Linear over non-overlapping
patches. ``PatchConv2d`` keeps ``nn.Conv2d``'s parameters, keys (``weight`` of shape
(out, in, k, k), ``bias``), init and ``isinstance`` checks, and computes
``F.linear(patches, weight.flatten(1), bias)`` instead of calling the convolution.

Why: inductor's CPU layout optimisation switches on for any graph that holds an
``aten.convolution`` (mkldnn available), and then forces channels-last strides on every dense
4-d tensor up- or downstream of one that the forward graph saves for backward. A whole
``torch.compile(SimMIM(...))`` has the patch embedding upstream of everything and the decoder
downstream, so every saved 4-d activation of the encoder went channels-last: attention's
(windows, heads, N, d) operands with heads innermost (the cosine normalisation then reduces
over a strided d, which inductor emits as an OpenMP parallel region per row, ~18k regions per
stage-0 block) and bmm operands with a batch stride of 1. Without a convolution in the graph
the optimisation stays off and the layouts are the ones the model asked for. Eager cost is the
same GEMM the convolution runs (mkldnn lowers a stride==kernel conv to one too).

Other geometries (padding, dilation, groups, overlapping kernels) run ``nn.Conv2d.forward``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gigamim.models.linear import linear


class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` for kernel == stride, no padding/dilation/groups: a GEMM over patches.

    ``forward`` takes and returns NCHW like the Conv2d; the output is a permuted view of an NHWC
    buffer (what mkldnn returns for channels-last input), so ``out.permute(0, 2, 3, 1)`` is free.
    Call the module (not ``forward_nhwc``) from a model: ZeRO-3 gathers the parameters in the
    module's own call."""

    def _is_patchify(self) -> bool:
        if isinstance(self.padding, str):  # "valid" pads nothing; "same" pads unless the kernel is 1x1
            no_pad = self.padding == "valid" or tuple(self.kernel_size) == (1, 1)
        else:
            no_pad = all(p == 0 for p in self.padding)
        return (no_pad and tuple(self.kernel_size) == tuple(self.stride) and tuple(self.dilation) == (1, 1)
                and self.groups == 1)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H // kh, W // kw, out)."""
        if not self._is_patchify():
            return super().forward(x).permute(0, 2, 3, 1)
        b, c, h, w = x.shape
        kh, kw = self.kernel_size
        if h % kh or w % kw:  # the convolution drops the incomplete last row / column of patches
            h, w = h - h % kh, w - w % kw
            x = x[:, :, :h, :w]
        if kh == kw == 1:
            patches = x.permute(0, 2, 3, 1)  # a view when x is channels-last (the SimMIM decoder's input)
        else:
            # (B, C, H/kh, kh, W/kw, kw) -> (B, H/kh, W/kw, C, kh, kw): the weight's (in, kh, kw) order.
            patches = x.reshape(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5).reshape(
                b, h // kh, w // kw, c * kh * kw)
        return linear(patches, self.weight.flatten(1), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_nhwc(x).permute(0, 3, 1, 2)
