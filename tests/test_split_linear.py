"""moesaic.core.split_linear: F.linear of a few rows split across the threads; bitwise F.linear wherever it splits."""

import pytest
import torch
import torch.nn.functional as F

from moesaic.core import split_linear as sl


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(512, 512), (2048, 512), (512, 1024), (96, 64), (1000, 300), (40, 16)])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (2,), (8,), (4, 8), (33,)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_f_linear_bitwise(dtype, shape, lead, bias, two_threads):
    g = torch.Generator().manual_seed(0)
    n_out, n_in = shape
    w = torch.randn(n_out, n_in, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    x = torch.randn(*lead, n_in, generator=g).to(dtype)
    with torch.no_grad():
        assert torch.equal(sl.split_linear(x, w, b), F.linear(x, w, b))


def test_splits_where_it_may_and_not_elsewhere(two_threads, monkeypatch):
    calls = []
    real = sl._split
    monkeypatch.setattr(sl, "_split", lambda *a: calls.append(a[3]) or real(*a))
    w, x = torch.randn(512, 512), torch.randn(1, 512)
    with torch.no_grad():
        sl.split_linear(x, w)
        assert calls[-1] == 2  # probed, then split in 2 (one part per thread)
        n = len(calls)
        sl.split_linear(torch.randn(64, 512), w)  # more than MAX_ROWS rows
        sl.split_linear(x, w.t().contiguous().t())  # a weight that is not contiguous
        sl.split_linear(x.double(), w.double().t().contiguous().t())
        torch.set_num_threads(1)
        sl.split_linear(x, w)  # one thread: nothing to split across
        torch.set_num_threads(2)
    sl.split_linear(x.requires_grad_(), w)  # autograd on
    assert len(calls) == n


def test_gradients_flow_through_the_unsplit_path(two_threads):
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(1, 32)
    sl.split_linear(x, w).sum().backward()
    assert torch.equal(w.grad, x.expand(64, 32))


def test_parts_divide_the_output_rows(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert sl._parts(512) == 16 and sl._parts(1000) == 10 and sl._parts(40) == 2 and sl._parts(31) == 1
    assert sl._parts(17) == 1  # 17 rows: parts of fewer than MIN_PART rows are not worth a thread


def test_linear_call_keeps_hooks_wrappers_and_autograd(two_threads):
    lin = torch.nn.Linear(32, 64, bias=False)
    x = torch.randn(1, 32)
    with torch.no_grad():
        assert torch.equal(sl.linear_call(lin, x), F.linear(x, lin.weight))
        seen = []
        h = lin.register_forward_hook(lambda m, a, out: seen.append(out.shape) or out * 2)
        assert torch.equal(sl.linear_call(lin, x), 2 * F.linear(x, lin.weight)) and seen == [(1, 64)]
        h.remove()
        g = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append("global"))
        sl.linear_call(lin, x)
        g.remove()
        assert seen[-1] == "global"

        class Wrapped(torch.nn.Linear):  # e.g. a LoRA or quantized projection: its own forward runs
            def forward(self, x):
                return super().forward(x) + 1

        w = Wrapped(32, 64)
        assert torch.equal(sl.linear_call(w, x), F.linear(x, w.weight, w.bias) + 1)
    y = sl.linear_call(lin, x.requires_grad_())
    y.sum().backward()
    assert y.grad_fn is not None
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0, keepdim=True))
