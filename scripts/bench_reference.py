"""The PyTorch + SpikingJelly reference timings that `spikeclip bench` is compared with.

    pip install torch spikingjelly==0.0.0.0.14
    python scripts/bench_reference.py [--case lif_fwd_bwd] [--threads 2]

Prints median, min and max seconds per iteration after warm-up, like `spikeclip bench`.
"""
import argparse
import statistics
import time

import torch
from spikingjelly.clock_driven import neuron, surrogate


def lif_fwd_bwd():
    node = neuron.MultiStepLIFNode(
        tau=2.0, detach_reset=True, surrogate_function=surrogate.Sigmoid(alpha=4.0), backend="torch"
    )
    x = (torch.randn(4, 32, 384, 8, 8) + 0.5).requires_grad_()
    g = torch.randn(4, 32, 384, 8, 8)

    def step():
        node.reset()
        x.grad = None
        node(x).backward(g)

    return step


CASES = {"lif_fwd_bwd": lif_fwd_bwd}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'case':<18} {'median_s':>11} {'min_s':>11} {'max_s':>11}  (torch {torch.__version__}, threads {args.threads})")
    for name in args.case or sorted(CASES):
        step = CASES[name]()
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(f"{name:<18} {statistics.median(times):>11.5f} {min(times):>11.5f} {max(times):>11.5f}")


if __name__ == "__main__":
    main()
