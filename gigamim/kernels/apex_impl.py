"""NVIDIA apex FusedLayerNorm path (CUDA only; used only when apex is already built).

apex fuses the LayerNorm itself but not the residual add, so this is LayerNorm-fused,
add-eager. Callers check `supports` first and fall back to torch otherwise."""

from __future__ import annotations

from apex.normalization.fused_layer_norm import fused_layer_norm_affine


def supports(x, weight, bias) -> bool:
    # apex's functional API needs both affine tensors; a half-affine norm goes to torch.
    return x.is_cuda and weight is not None and bias is not None and x.numel() > 0


def layer_norm(x, weight, bias, eps):
    # Keywords: old apex releases took (input, normalized_shape, weight, bias, eps), new ones
    # (input, weight, bias, normalized_shape, eps); the names are the same in both.
    return fused_layer_norm_affine(input=x, weight=weight, bias=bias, normalized_shape=(x.shape[-1],), eps=eps)


def residual_post_norm(shortcut, y, weight, bias, eps, drop_path_scale):
    normed = layer_norm(y, weight, bias, eps)
    if drop_path_scale is not None:
        normed = normed * drop_path_scale
    return shortcut + normed
