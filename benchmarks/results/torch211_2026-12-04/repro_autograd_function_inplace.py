"""Plain-torch reproduction of pytorch/pytorch#180642 as it hit gigamim (no DeepSpeed needed).

A custom autograd.Function shaped like DeepSpeed's LinearFunctionForZeroStage3 (forward without
ctx + setup_context; out = x @ w.t(); out += b in place for inputs that are not 2-D), compiled
with backend="eager" (dynamo alone). Prints |eager grad - compiled grad| / |eager grad| for
x, w, b. torch 2.11.0: 2-D inputs agree, 3-D ones give compiled gradients of 0 ("117/117");
torch 2.14.1: 0 everywhere. `outofplace` (out = out + b) is right on both.

    python repro_autograd_function_inplace.py [inplace|outofplace]
"""
import sys, torch

class Lin(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b):
        if x.dim() == 2 and VARIANT != "noaddmm":
            return torch.addmm(b, x, w.t())
        out = x.matmul(w.t())
        if VARIANT == "outofplace":
            out = out + b
        else:
            out += b
        return out
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
    @staticmethod
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.matmul(w)
        if ctx.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return gx, gw, gb

VARIANT = sys.argv[1] if len(sys.argv) > 1 else "inplace"
def f(x, w, b):
    return Lin.apply(x, w, b).square().sum()
torch.manual_seed(0)
for shape in [(2, 4), (2, 5, 4)]:
    x = torch.randn(*shape, requires_grad=True); w = torch.randn(3, 4, requires_grad=True); b = torch.randn(3, requires_grad=True)
    ge = torch.autograd.grad(f(x, w, b), [x, w, b])
    torch._dynamo.reset()
    gc = torch.autograd.grad(torch.compile(f, backend="eager")(x, w, b), [x, w, b])
    print(torch.__version__, VARIANT, shape, [f"{(a - c).norm().item():.3g}/{a.norm().item():.3g}" for a, c in zip(ge, gc)])
