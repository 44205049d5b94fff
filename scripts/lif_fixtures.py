"""Reference LIF outputs and input gradients from SpikingJelly, for tests/lif_parity.rs.

    pip install torch spikingjelly==0.0.0.0.14 safetensors
    python scripts/lif_fixtures.py            # writes tests/fixtures/lif_spikingjelly.*

Every case runs SpikingJelly's MultiStepLIFNode (torch backend) on a random input of shape
[T, N], backpropagates a random upstream gradient, and stores input, upstream gradient, spikes
and input gradient. The Rust tests must reproduce the spikes exactly and the gradient to 1e-5.
"""
import itertools
import json
import pathlib

import torch
from safetensors.torch import save_file
from spikingjelly.clock_driven import neuron, surrogate

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
T, N = 5, 48


def main():
    torch.manual_seed(0)
    tensors, cases = {}, []
    grid = itertools.product(
        [2.0, 1.5],  # tau
        [1.0, 0.5],  # v_threshold
        [0.0, None, -0.2],  # v_reset (None = soft reset)
        [True, False],  # detach_reset
        ["sigmoid", "atan"],
        [True, False],  # decay_input
    )
    for i, (tau, v_th, v_reset, detach, sg, decay) in enumerate(grid):
        fn = surrogate.Sigmoid(alpha=4.0) if sg == "sigmoid" else surrogate.ATan(alpha=2.0)
        node = neuron.MultiStepLIFNode(
            tau=tau,
            v_threshold=v_th,
            v_reset=v_reset,
            detach_reset=detach,
            surrogate_function=fn,
            decay_input=decay,
            backend="torch",
        )
        # Inputs around the threshold so that neurons fire at a mix of rates.
        x = (torch.randn(T, N) * 0.8 + 0.6 * v_th * (1.0 if decay else 0.5) * tau).requires_grad_()
        spikes = node(x)
        grad_out = torch.randn(T, N)
        spikes.backward(grad_out)
        key = f"case{i}"
        tensors[f"{key}.x"] = x.detach().contiguous()
        tensors[f"{key}.grad_out"] = grad_out
        tensors[f"{key}.spikes"] = spikes.detach().contiguous()
        tensors[f"{key}.grad_x"] = x.grad.contiguous()
        cases.append(
            {
                "name": key,
                "tau": tau,
                "v_threshold": v_th,
                "v_reset": v_reset,
                "detach_reset": detach,
                "surrogate": sg,
                "decay_input": decay,
                "firing_rate": float(spikes.detach().mean()),
            }
        )
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "lif_spikingjelly.safetensors"))
    meta = {"source": "spikingjelly==0.0.0.0.14 MultiStepLIFNode(backend='torch')", "cases": cases}
    (OUT / "lif_spikingjelly.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
