"""``F.linear`` of a few rows on the CPU, with the weight's output rows split across the intra-op threads.

A decode step at batch 1 is a chain of matrix-vector products whose cost is reading the weights. PyTorch's
CPU ``F.linear`` of one row (the BLAS gemv, and gemm for a few rows) runs on one thread: with torch 2.13's
MKL on the 2-core AMD EPYC of our benchmarks, a ``[1024, 512]`` weight streams at 10 GB/s at 1 and at 2
threads, while the two cores read memory at 34 GB/s (``torch.sum``). ``torch.bmm`` over ``c`` views of the
weight, ``W.view(c, O / c, I)``, hands each part to a thread: 1.4-1.9x faster for one row at 2 threads, 1.1-2.3x
for 2 to 32 rows, and nothing from 64 rows on, where gemm has its own threads (docs/benchmarks.md, "Decode:
matrix-vector products on every core").

Each output element is still one dot product over the whole input row, computed by the same BLAS kernel, so the
result is bitwise ``F.linear``'s wherever we measured (one row, no bias, float32 and bfloat16). Where a kernel
differs (a bias added inside gemm, parts of unaligned size) it is not, so the first call of each (dtype, shape,
rows, parts, bias) compares both on a random input and uses the split only when they are bitwise equal: the
decode plan (docs/inference.md) relies on equality with the module path, which calls ``F.linear``. The
split runs only on the CPU, without autograd, autocast or ``torch.compile``, with 2 or more threads and at most
:data:`MAX_ROWS` rows; elsewhere this is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

#: Rows up to which the split pays (measured 1.1-2.3x up to 32 rows at 2 threads, 0.99-1.12x at 64).
MAX_ROWS = 32
#: Fewest output rows per part.
MIN_PART = 16
#: (dtype, O, I, rows, parts, with bias) -> whether the split is bitwise F.linear (probed once each).
_BITWISE: dict[tuple[torch.dtype, int, int, int, int, bool], bool] = {}


def _parts(out_features: int) -> int:
    """How many parts the output rows are split into: the intra-op thread count, fewer where it does not
    divide ``out_features`` or parts would get fewer than :data:`MIN_PART` rows."""
    c = min(torch.get_num_threads(), out_features // MIN_PART)
    while c > 1 and out_features % c:
        c -= 1
    return c


def _split(x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None, c: int) -> Tensor:
    """The reference of the fast path, readable: part ``p`` of the ``c`` parts is ``x_MI @ w_OI[p*n/c:(p+1)*n/c].T``."""
    M, (n_out, n_in) = x_MI.shape[0], w_OI.shape
    y_cMP = torch.bmm(x_MI.expand(c, M, n_in), w_OI.view(c, n_out // c, n_in).transpose(1, 2))
    y_MO = y_cMP.transpose(0, 1).reshape(M, n_out) if M > 1 else y_cMP.view(1, n_out)
    return y_MO if b_O is None else y_MO + b_O


def _bitwise(x_MI: Tensor, w_OI: Tensor, b_O: Tensor | None, c: int) -> bool:
    key = (w_OI.dtype, w_OI.shape[0], w_OI.shape[1], x_MI.shape[0], c, b_O is not None)
    ok = _BITWISE.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(0)  # random operands: the model's own weights may hold NaN
        x, w = (torch.randn(s, generator=g).to(w_OI.dtype) for s in (x_MI.shape, w_OI.shape))
        b = None if b_O is None else torch.randn(b_O.shape, generator=g).to(b_O.dtype)
        ok = _BITWISE[key] = torch.equal(_split(x, w, b, c), F.linear(x, w, b))
    return ok


def split_linear(x: Tensor, w_OI: Tensor, b_O: Tensor | None = None) -> Tensor:
    """``F.linear(x, w_OI, b_O)``, bitwise, faster for a few rows on the CPU (module docstring)."""
    n_out, n_in = w_OI.shape
    M = x.numel() // n_in if n_in else 0
    if (0 < M <= MAX_ROWS and x.device.type == "cpu" and w_OI.is_contiguous() and x.dtype == w_OI.dtype
            and not torch.is_grad_enabled() and x.shape[-1] == n_in and (b_O is None or b_O.dtype == x.dtype)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        c = _parts(n_out)
        if c > 1:
            x_MI = x.reshape(M, n_in)
            if _bitwise(x_MI, w_OI, b_O, c):
                return _split(x_MI, w_OI, b_O, c).view(*x.shape[:-1], n_out)
    return F.linear(x, w_OI, b_O)


def plain(m: nn.Module) -> bool:
    """Whether calling ``m`` is exactly ``m.forward(...)`` of its class: no hooks, no compiled or patched forward."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or m._compiled_call_impl is not None or "forward" in m.__dict__)


def global_hooks() -> bool:
    """Whether a module hook is registered for every module (``nn.modules.module.register_module_forward_hook``...)."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks)


def linear_call(m: nn.Module, x: Tensor) -> Tensor:
    """``m(x)``; for a plain ``nn.Linear`` (:func:`plain`, no global hooks) without autograd on the CPU, its
    :func:`split_linear` (bitwise the same). Wrapped or hooked projections (LoRA, quantized, a forward hook) are
    called as modules."""
    if (torch.is_grad_enabled() or x.device.type != "cpu" or type(m) is not nn.Linear or not plain(m)
            or global_hooks()):
        out: Tensor = m(x)
        return out
    return split_linear(x, m.weight, m.bias)
