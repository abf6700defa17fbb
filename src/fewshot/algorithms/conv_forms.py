"""How a plain Conv2d can run inside MAML's vmap step (VmapForms.batched_conv): the same numbers, to any order of
derivative (tests/test_algorithms.py), through other kernels.

After the first inner step the weights differ per task, so under vmap each convolution is one grouped convolution
over the tasks, and second-order MAML differentiates it twice. Two costs follow on a GPU. torch's convolution double
backward runs one small convolution per group for one of its terms (the weight's derivative of the input gradient).
And cuDNN runs a grouped *input gradient* (dgrad; a transposed convolution is one) as one kernel per group for
these shapes: the Omniglot 20-way profile of the "split" form on an H200 spends 15.4 of its 32.9 kernel-ms in 672
dgrad kernels, 42 grouped dgrads of 16 tasks each, while its grouped forward convolutions run one kernel apiece.

- "matmul": unfold + one batched matmul; no convolution at all.
- "split": cuDNN's forward; the input gradient as a transposed convolution, the weight gradient as torch's own.
  Never reaches torch's per-group loop; still runs grouped dgrads.
- "fprop": every input gradient, at every order, as a forward convolution: the output gradient spread out with
  stride − 1 zeros between its pixels, padded, and convolved with the weight flipped and its channels swapped.
  For a stride-2 convolution that spends 4× the multiply-adds of a dgrad (three quarters on zeros) in one kernel
  where the dgrad spends 16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (stride, padding, dilation, groups) of a convolution, each pair as a tuple
Spec = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]


def _output_size(conv: nn.Conv2d, size: int, i: int) -> int:
    k, st, p, d = conv.kernel_size[i], conv.stride[i], conv.padding[i], conv.dilation[i]
    return (size + 2 * p - d * (k - 1) - 1) // st + 1


def _conv2d_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) as im2col (unfold) and one contraction, which under vmap with per-task weights is one batched
    matmul over the tasks; its derivatives, to any order, are matmuls and fold/unfold again."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    size = (_output_size(conv, x.shape[-2], 0), _output_size(conv, x.shape[-1], 1))
    # einsum, not weight @ cols: broadcasting the weight over the images copies it once per image under vmap
    out = torch.einsum("ok,nkl->nol", conv.weight.flatten(1), cols).unflatten(-1, size)
    return out if conv.bias is None else out + conv.bias.view(-1, 1, 1)


def _spec(conv: nn.Conv2d) -> Spec:
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _left_out(in_size, out_size, kernel, spec: Spec) -> list[int]:
    """Per spatial dim, the trailing input rows a strided convolution's output does not depend on (what a transposed
    convolution gives back as output_padding)."""
    stride, padding, dilation, _ = spec
    return [
        in_size[i] - ((out_size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
        for i in range(2)
    ]


def _spread(t: torch.Tensor, stride: int, dim: int) -> torch.Tensor:
    """t with stride − 1 zeros between neighbours along dim (-2 or -1), in ops that vmap and autograd both take."""
    if stride == 1:
        return t
    n = t.shape[dim]
    t = t.unsqueeze(dim)  # a new axis of length 1 after dim, padded to `stride` and merged into it
    t = F.pad(t, (0, stride - 1) if dim == -1 else (0, 0, 0, stride - 1))
    return t.flatten(dim - 1, dim).narrow(dim, 0, (n - 1) * stride + 1)


def _input_gradient(g: torch.Tensor, weight: torch.Tensor, spec: Spec, size) -> torch.Tensor:
    """The gradient of conv2d(x, weight) in x (spatial size `size`) given the output's gradient g, as one forward
    convolution: g spread by the stride, padded by dilation·(k − 1) − padding (negative pads crop), with the rows
    the stride left out added at the end, convolved with the weight flipped and its in and out channels swapped
    within each group. Equals conv_transpose2d (tests/test_algorithms.py)."""
    stride, padding, dilation, groups = spec
    k = weight.shape[-2:]
    left_out = _left_out(size, g.shape[-2:], k, spec)
    z = _spread(_spread(g, stride[0], -2), stride[1], -1)
    lo = [dilation[i] * (k[i] - 1) - padding[i] for i in range(2)]
    z = F.pad(z, (lo[1], lo[1] + left_out[1], lo[0], lo[0] + left_out[0]))
    out_ch = weight.shape[0]
    w = weight.unflatten(0, (groups, out_ch // groups)).transpose(1, 2).flatten(0, 1).flip(-2, -1)
    return F.conv2d(z, w, None, 1, 0, dilation, groups)


def _weight_gradient(x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, spec: Spec) -> torch.Tensor:
    stride, padding, dilation, groups = spec
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False]
    )[1]


class _FpropConv2d(torch.autograd.Function):
    """conv2d whose input gradients, at every order, are forward convolutions (_input_gradient). The three
    Functions here are closed under differentiation: each one's backward is made of the three, so no derivative
    of any order reaches torch's own convolution formulas (and their grouped dgrads)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, spec):  # type: ignore[override]
        return F.conv2d(x, weight, bias, *spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, spec = inputs
        ctx.save_for_backward(x, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _InputGradient.apply(g, weight, ctx.spec, tuple(x.shape[-2:]))
        if ctx.needs_input_grad[1]:
            gw = _WeightGradient.apply(x, g, weight, ctx.spec)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


class _InputGradient(torch.autograd.Function):
    """_input_gradient(g, weight): linear in g (its derivative the forward convolution) and in weight (a weight
    gradient, with the incoming gradient as the input and g as the output gradient)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, weight, spec, size):  # type: ignore[override]
        return _input_gradient(g, weight, spec, size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, weight, spec, _ = inputs
        ctx.save_for_backward(g, weight)
        ctx.spec = spec

    @staticmethod
    def backward(ctx, h):  # type: ignore[override]
        g, weight = ctx.saved_tensors
        dg = _FpropConv2d.apply(h, weight, None, ctx.spec) if ctx.needs_input_grad[0] else None
        dw = _WeightGradient.apply(h, g, weight, ctx.spec) if ctx.needs_input_grad[1] else None
        return dg, dw, None, None


class _WeightGradient(torch.autograd.Function):
    """_weight_gradient(x, g): linear in x (its derivative an input gradient, here a forward convolution) and in g
    (the forward convolution of x with the incoming gradient)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, g, weight, spec):  # type: ignore[override]
        return _weight_gradient(x, g, weight, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, g, _, spec = inputs
        ctx.save_for_backward(x, g)
        ctx.spec = spec

    @staticmethod
    def backward(ctx, h):  # type: ignore[override]
        x, g = ctx.saved_tensors
        dx = _InputGradient.apply(g, h, ctx.spec, tuple(x.shape[-2:])) if ctx.needs_input_grad[0] else None
        dg = _FpropConv2d.apply(x, h, None, ctx.spec) if ctx.needs_input_grad[1] else None
        return dx, dg, None, None


def _transposed_input_gradient(g: torch.Tensor, weight: torch.Tensor, spec: Spec, size) -> torch.Tensor:
    """The gradient of conv2d(x, weight) in x (spatial size `size`), given the output's gradient g, as cuDNN's own
    transposed convolution (the split form's; _input_gradient is the fprop form's)."""
    stride, padding, dilation, groups = spec
    pad = _left_out(size, g.shape[-2:], weight.shape[-2:], spec)
    return F.conv_transpose2d(g, weight, None, stride, padding, pad, groups, dilation)


class _SplitConv2d(_FpropConv2d):
    """conv2d (cuDNN), _FpropConv2d's forward, whose backward is written in differentiable torch ops: the input
    gradient as a transposed convolution, the weight gradient as torch's own (convolution_backward for the weight
    alone). Differentiated again, neither reaches the term of torch's convolution double backward that, with
    groups > 1 (vmap's per-task weights), runs one small convolution per group: the weight's derivative of the
    input gradient."""

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _transposed_input_gradient(g, weight, ctx.spec, x.shape[-2:])
        if ctx.needs_input_grad[1]:
            gw = _SplitWeightGradient.apply(x, g, weight, ctx.spec)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


class _SplitWeightGradient(_WeightGradient):
    """_weight_gradient (torch's own), whose derivatives are the split form's: a transposed convolution and a
    forward one. As a Function it keeps x and g as they come. Recorded op by op instead, under vmap it kept the
    copies vmap's batching makes of both in the (images, tasks·channels) layout of a per-task weight gradient (with
    the first step split too, VmapForms.first_step_conv: an Omniglot 5w1s step on a CPU peaks at 95.6 MiB in place
    of 108.5). And where x needs no gradient (the images) it computes no input gradient, which torch's double
    backward did as a grouped dgrad: Omniglot 20w1s, 4 fewer of them per meta-gradient (149 convolutions where 153)."""

    @staticmethod
    def backward(ctx, h):  # type: ignore[override]
        x, g = ctx.saved_tensors
        dx = dg = None
        if ctx.needs_input_grad[0]:
            dx = _transposed_input_gradient(g, h, ctx.spec, x.shape[-2:])
        if ctx.needs_input_grad[1]:
            dg = _SplitConv2d.apply(x, h, None, ctx.spec)
        return dx, dg, None, None


def _conv2d_split(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _SplitConv2d.apply(x, conv.weight, conv.bias, _spec(conv))


def _conv2d_fprop(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _FpropConv2d.apply(x, conv.weight, conv.bias, _spec(conv))


# How a plain Conv2d may run (VmapForms.batched_conv): as the module does (cuDNN), or one of the forms above.
CONV_FORMS = {"cudnn": None, "matmul": _conv2d_as_matmul, "split": _conv2d_split, "fprop": _conv2d_fprop}
