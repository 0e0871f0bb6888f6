"""What every memory-lean bypass function shares: the dtype it computes in, what it keeps of the layer input,
the fused output add, recomputation for backward, and a convolution's backward from saved tensors.

The bypass functions themselves live in :mod:`.bypass_conv` (the generic convolution bypass),
:mod:`.bypass_kron` (LoKr) and :mod:`.bypass_khatri_rao` (LoHa).  Each computes ``result + alpha · ΔW x`` in
one autograd node that keeps the layer input ``x`` (the caller's storage, not a copy, unless a dtype cast
makes a smaller copy), the small factors and at most one rank-sized input-side result, and recomputes the
rest in backward.

Dtypes: the products run in the autocast dtype when autocast is on for the input's device (as autocast would
run them), else in the promoted dtype of input and factors; gradients come back in each input's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .geometry import LayerGeometry


def autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta): nothing there autocasts
        return False


def compute_dtype(x: Tensor, factor: Tensor) -> torch.dtype:
    """The dtype the adapter's products run in: autocast's when it is on, else the promoted dtype."""
    device_type = x.device.type
    if autocasting(device_type):
        try:
            return torch.get_autocast_dtype(device_type)
        except AttributeError:  # torch < 2.4
            return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
    return torch.promote_types(x.dtype, factor.dtype)


def input_to_save(x: Tensor, dtype: torch.dtype) -> Tensor:
    """What to keep of the layer input: the input itself (shared storage), or its cast when that is smaller."""
    if x.dtype != dtype and torch.empty((), dtype=dtype).element_size() < x.element_size():
        return x.to(dtype)
    return x


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (``None`` stays ``None``: an optional factor).  The dtype test first: a no-op
    ``Tensor.to`` still costs a dispatcher round trip, which adds up over every layer of a small model."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def grad_like(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """A gradient in the dtype of the input it belongs to (``None`` when there is none)."""
    return None if grad is None or like is None else cast(grad, like.dtype)


def add_output(result: Tensor, delta: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · delta`` in one pass; the output keeps ``result``'s dtype unless autocasting."""
    if result.dtype == dtype:
        return torch.add(result, delta, alpha=alpha)
    if autocasting(result.device.type):
        return torch.add(result.to(dtype), delta, alpha=alpha)
    return torch.add(result, delta.mul_(alpha).to(result.dtype))


def addmm_output(result: Tensor, hidden: Tensor, up: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """``result + alpha · hidden @ upᵀ`` with rows lined up: result (…, k·out) as rows (N, out), hidden (N, R),
    up (out, R)."""
    rows = result.reshape(-1, up.shape[0])
    if rows.dtype == dtype:
        return torch.addmm(rows, hidden, up.t(), alpha=alpha).reshape(result.shape)
    if autocasting(result.device.type):
        return torch.addmm(rows.to(dtype), hidden, up.t(), alpha=alpha).reshape(result.shape)
    return torch.add(rows, (hidden @ up.t()).mul_(alpha).to(rows.dtype)).reshape(result.shape)


def recompute(fn: Callable, inputs: list[Tensor | None], needs: list[bool]) -> tuple[Tensor, Callable]:
    """``fn(*inputs)`` recomputed (detached) and a function mapping its gradient to the inputs' gradients
    (``None`` for those that need none).  Autograd tracks the recomputation only when a gradient is needed."""
    track = any(needs)
    with torch.enable_grad() if track else torch.no_grad():
        leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]
        out = fn(*leaves)

    def grads_of(grad: Tensor) -> list[Tensor | None]:
        wanted = [t for t, n in zip(leaves, needs, strict=True) if t is not None and n]
        found = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return [next(found) if t is not None and n else None for t, n in zip(leaves, needs, strict=True)]

    return out.detach(), grads_of


def explicit_padding(geometry: LayerGeometry) -> bool:
    """Whether :func:`conv_grads` can run this geometry's convolution backward."""
    if geometry.padding_mode != "zeros" or not isinstance(geometry.padding, str) or geometry.padding == "valid":
        return True
    return not any(dil * (k - 1) % 2 for dil, k in zip(geometry.dilation, geometry.kernel, strict=True))


def conv_grads(
    geometry: LayerGeometry, x: Tensor, weight: Tensor, grad: Tensor, need_x: bool, need_weight: bool
) -> tuple[Tensor | None, Tensor | None] | None:
    """Gradients of ``geometry.conv(x, weight)`` (one group) for the output gradient ``grad``, from the saved
    input and weight, without running the convolution again; ``None`` when the padding has no explicit
    symmetric form (``padding="same"`` with an odd total)."""
    n = len(geometry.kernel)
    padding = geometry.padding
    if geometry.padding_mode != "zeros":
        padding = (0,) * n  # explicit padding first (geometry.pad_input), as geometry.conv does
    elif isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * n
        else:
            total = [dil * (k - 1) for dil, k in zip(geometry.dilation, geometry.kernel, strict=True)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    with torch.enable_grad() if need_x and geometry.padding_mode != "zeros" else contextlib.nullcontext():
        leaf = x.detach().requires_grad_(need_x) if geometry.padding_mode != "zeros" else x
        padded = geometry.pad_input(leaf)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad,
        padded.detach(),
        weight,
        None,
        list(geometry.stride),
        list(padding),
        list(geometry.dilation),
        False,
        [0] * n,
        1,
        [need_x, need_weight, False],
    )
    if need_x and geometry.padding_mode != "zeros":
        grad_x = torch.autograd.grad(padded, leaf, grad_x)[0]
    return grad_x, grad_w
