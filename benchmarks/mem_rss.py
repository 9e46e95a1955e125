"""Cross-check of the layer's fwd+bwd memory on CPU by the process's resident-set high-water mark.

glibc serves large blocks with mmap and returns them on free, so the resident set follows the live
tensors; ``ru_maxrss`` after one fwd+bwd minus the resident set just before it is the peak growth. The
high-water mark never goes down, so run one implementation per process:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/mem_rss.py limit|auto|loop|fused [T E k]

Prints the growth minus the parameter gradients (which every layer with the same weights allocates).
"""

import resource
import sys

import torch
from torch.nn import functional as Fn

import moesaic


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(which: str, T: int = 8192, E: int = 64, k: int = 8, D: int = 512, F: int = 1024) -> None:
    torch.set_num_threads(1)
    N = T * k
    if which == "limit":  # one dense SwiGLU FFN over the T*k rows
        up = torch.nn.Parameter(torch.randn(2 * F, D) / D**0.5)
        down = torch.nn.Parameter(torch.randn(D, F) / F**0.5)
        x = torch.randn(N, D, requires_grad=True)
        params = [up, down]

        def run():
            g, u = Fn.linear(x, up).chunk(2, -1)
            y = Fn.linear(Fn.silu(g) * u, down)
            y.backward(torch.ones_like(y))
    else:
        layer = moesaic.moe_layer(D, F, E, k, experts={"kind": "glu", "backend": which},
                                  router={"kind": "topk", "aux_loss_coef": 0.0})
        x = torch.randn(T, D, requires_grad=True)
        params = list(layer.parameters())

        def run():
            y = layer(x)
            y.backward(torch.ones_like(y))

    grads = sum(p.numel() * p.element_size() for p in params)
    before = rss()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(f"{which} T={T} E={E} k={k}: peak growth {(peak - before) / 2**20:.0f} MB, "
          f"minus parameter gradients {(peak - before - grads) / 2**20:.0f} MB")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
