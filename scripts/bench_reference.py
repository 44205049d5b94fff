"""The PyTorch + SpikingJelly reference of `spikeclip bench`'s cases, on the paper's model.

    pip install torch spikingjelly==0.0.0.0.14
    python scripts/bench_reference.py [--case img_train_b32]... [--threads 2] [--json out.json]

The model is the authors' one as `scripts/encoder_fixtures.py` builds it (their parameter
names, SpikingJelly's MultiStepLIFNode), at the paper's size ("4-384", T = 4, 32x32, CLIP's
vocabulary). The cases mirror `src/cli/bench/model.rs`: a training step is the features in
training mode, `1 - cos` against random 512-d targets, backward and Adam over every parameter
of the tower (the token embeddings included); inference is eval mode under no_grad, with every
BatchNorm's shift set to 0.5 so that a fresh model fires at about a trained one's rate.

Without `--case` every case runs, each in its own process, so that the peak resident memory
(ru_maxrss) is the case's own. Prints median, min and max seconds per step after warm-up and
the peak RSS, like `spikeclip bench`; `--json` also writes them.
"""
import argparse
import importlib.metadata
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.clock_driven import functional, neuron, surrogate

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import encoder_fixtures as authors  # noqa: E402

# The paper preset of `src/model/config.rs`.
authors.CFG.update({
    "time_steps": 4,
    "embed_dim": 512,
    "image": {"in_channels": 3, "image_size": 32, "embed_dim": 384, "heads": 8,
              "mlp_ratio": 4, "depth": 4, "attn_scale": 0.125},
    "text": {"kind": "mlp", "vocab_size": 49408, "context_length": 20, "position_slots": 77,
             "width": 512, "hidden": 2048},
})
# `bench`'s BatchNorm shift of the inference cases (INFER_SHIFT).
INFER_SHIFT = 0.5


def without_hooks(model):
    """The fixture script counts spikes with forward hooks; a benchmark must not pay for them."""
    for m in model.modules():
        m._forward_hooks.clear()
    return model


def image_model():
    model = authors.ImageEncoder()
    # The fixture script keeps the tokenizer's LIFs in a plain list (it runs one forward):
    # registered, reset_net resets them between steps and their hooks come off too.
    model.patch_embed.lifs = nn.ModuleList(model.patch_embed.lifs)
    return without_hooks(model)


def text_model():
    return without_hooks(authors.TextEncoder())


def images(b):
    return torch.randn(b, 3, 32, 32)


def token_ids(b):
    tx = authors.CFG["text"]
    return torch.randint(0, tx["vocab_size"], (b, tx["context_length"]))


def train_step(model, x):
    """One distillation step, as `bench`'s `train_step`."""
    model.train()
    targets = torch.randn(x.shape[0], authors.CFG["embed_dim"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        functional.reset_net(model)
        opt.zero_grad(set_to_none=True)
        loss = (1.0 - F.cosine_similarity(model(x), targets, dim=-1)).mean()
        loss.backward()
        opt.step()

    return step


def infer(model, x):
    """Eval-mode features under no_grad, every BatchNorm shifted to fire at inference rates."""
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.bias.fill_(INFER_SHIFT)

    def step():
        functional.reset_net(model)
        with torch.no_grad():
            model(x)

    return step


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


# name: (step factory, items per step, default warm-up, default timed iterations)
CASES = {
    "img_train_b32": (lambda: train_step(image_model(), images(32)), 32, 1, 5),
    "img_train_b64": (lambda: train_step(image_model(), images(64)), 64, 1, 5),
    "img_infer_b64": (lambda: infer(image_model(), images(64)), 64, 1, 5),
    "txt_train_b256": (lambda: train_step(text_model(), token_ids(256)), 256, 1, 5),
    "txt_infer_b1024": (lambda: infer(text_model(), token_ids(1024)), 1024, 1, 5),
    "lif_fwd_bwd": (lif_fwd_bwd, None, 3, 20),
}


def run_case(name, threads, iters, warmup):
    """Times one case in this process; the peak RSS is this process's."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    factory, items, default_warmup, default_iters = CASES[name]
    step = factory()
    for _ in range(default_warmup if warmup is None else warmup):
        step()
    times = []
    for _ in range(max(1, default_iters if iters is None else iters)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "iters": len(times),
    }
    if items:
        result["throughput_per_s"] = items / median
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), action="append",
                    help="run only these cases (default: all, each in its own process)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, help="timed iterations (default: 5, lif_fwd_bwd 20)")
    ap.add_argument("--warmup", type=int, help="untimed iterations (default: 1, lif_fwd_bwd 3)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    ap.add_argument("--in-process", action="store_true",
                    help="run the cases in this process (what each child does)")
    args = ap.parse_args()
    names = args.case or list(CASES)
    print(f"{'case':<18} {'median_s':>11} {'min_s':>11} {'max_s':>11} {'peak_rss_mib':>12}"
          f"  (torch {torch.__version__}, spikingjelly {importlib.metadata.version('spikingjelly')},"
          f" threads {args.threads})", flush=True)
    results = {}
    for name in names:
        if args.in_process or len(names) == 1:
            r = run_case(name, args.threads, args.iters, args.warmup)
        else:
            r = run_child(name, args)
        results[name] = r
        print(f"{name:<18} {r['median_s']:>11.5f} {r['min_s']:>11.5f} {r['max_s']:>11.5f}"
              f" {r['peak_rss_mib']:>12.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def run_child(name, args):
    """One case in a fresh interpreter, its result read back from the JSON file it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--in-process", "--case", name,
               "--threads", str(args.threads), "--json", str(out)]
        for flag in ("iters", "warmup"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag}", str(getattr(args, flag))]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())[name]


if __name__ == "__main__":
    main()
