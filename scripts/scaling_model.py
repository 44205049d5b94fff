#!/usr/bin/env python3
"""Modelled cluster scaling of data-parallel image distillation, from this machine's figures.

    scripts/scaling_model.py --step-s S --step-images B --grad-bytes G --bn-calls K --bn-bytes N
                             [--per-rank 196] [--latency-us 30] [--bucket-mib 4]

Inputs, all measured by `spikeclip bench --case img_train_b64` (see README, "Data-parallel
training over MPI"):
  --step-s, --step-images   median seconds of one training step of B images in one process;
                            a rank's compute time for its batch is taken as linear in images;
  --grad-bytes              bytes of the gradient all-reduce per step (under mpirun);
  --bn-calls, --bn-bytes    synchronised BatchNorm's all-reduces per step and their bytes.
Assumed, not measured (no cluster here): the network's per-message latency (--latency-us) and
its bandwidth (10, 25, 100 Gb/s). The model: a ring all-reduce of the gradients in buckets of
--bucket-mib, 2 (N-1)/N G / BW + 2 (N-1) alpha per bucket; each BatchNorm all-reduce a
latency-bound tree, 2 log2(N) (alpha + bytes / BW); no overlap of communication with backward
(the code does not overlap), so the figures are a lower bound on what overlap would give.
Prints a markdown table: images/s and efficiency (compute / (compute + communication)).
"""
import argparse
import math

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--step-s", type=float, required=True)
p.add_argument("--step-images", type=int, required=True)
p.add_argument("--grad-bytes", type=float, required=True)
p.add_argument("--bn-calls", type=float, required=True)
p.add_argument("--bn-bytes", type=float, required=True)
p.add_argument("--per-rank", type=int, default=196)
p.add_argument("--latency-us", type=float, default=30.0)
p.add_argument("--bucket-mib", type=float, default=4.0)
a = p.parse_args()

compute = a.step_s * a.per_rank / a.step_images
alpha = a.latency_us * 1e-6
buckets = math.ceil(a.grad_bytes / (a.bucket_mib * 2**20))


def communication(n, gbit):
    if n == 1:
        return 0.0
    bw = gbit * 1e9 / 8
    ring = 2 * (n - 1) / n * a.grad_bytes / bw + 2 * (n - 1) * alpha * buckets
    hops = 2 * math.ceil(math.log2(n))
    bn = a.bn_calls * hops * alpha + hops * a.bn_bytes / bw
    return ring + bn


nodes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
speeds = [10, 25, 100]
print(f"compute per step of {a.per_rank} images per rank: {compute:.2f} s; gradients "
      f"{a.grad_bytes / 1e6:.1f} MB in {buckets} buckets; {a.bn_calls:.0f} BatchNorm "
      f"all-reduces per step; latency {a.latency_us:.0f} us (assumed)\n")
head = " | ".join(f"{g} Gb/s: images/s, efficiency" for g in speeds)
print(f"| nodes | {head} |")
print("|---|" + "---|" * len(speeds))
for n in nodes:
    cells = []
    for g in speeds:
        step = compute + communication(n, g)
        cells.append(f"{n * a.per_rank / step:,.0f}, {100 * compute / step:.1f} %")
    print(f"| {n} | " + " | ".join(cells) + " |")
# The compute time per step below which 64 nodes on 25 Gb/s fall under 80 % efficiency: how
# much faster than this machine a node may be before the network dominates.
floor = 4 * communication(64, 25)
print(f"\n64 nodes at 25 Gb/s stay at >= 80 % efficiency while a step's compute takes at least "
      f"{floor * 1e3:.0f} ms ({compute / floor:.0f}x faster nodes than this one).")
