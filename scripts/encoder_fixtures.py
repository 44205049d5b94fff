"""Parity fixture for importing the SpikeCLIP authors' PyTorch checkpoints.

Builds the image encoder (Spikingformer tokenizer + spiking self-attention blocks + TDW
readout) and the MLP text encoder with the authors' parameter names and SpikingJelly's
MultiStepLIFNode (backend torch), at a small size, randomises the BatchNorm statistics, and
writes, under tests/fixtures/encoders/:
  image.pth       plain state_dict with a DDP `module.` prefix
  text.pth.tar    {"state_dict": ..., "epoch": 3}
  the same weights as the other forms a checkpoint of theirs takes, for `spikeclip import`:
  image_plain.pth          plain state_dict, no prefix
  image_wrapped.pth.tar    {"state_dict": `module.`-prefixed, "epoch": 3}
  text_transformers.pth    plain state_dict with the `clip_embedding.position_ids` buffer that
                           transformers 4.30's CLIPTextEmbeddings registers (an expanded arange)
  config.json     the matching SpikeClipConfig
  io.safetensors  inputs, eval-mode features and per-layer, per-step spike counts
  maxpool.safetensors  nn.MaxPool2d(3, 2, 1) output and input gradient
Run: /opt/refpy/bin/python scripts/encoder_fixtures.py
"""
import json
import pathlib

import torch
import torch.nn as nn
from safetensors.torch import save_file
from spikingjelly.clock_driven.neuron import MultiStepLIFNode

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "encoders"
CFG = {
    "time_steps": 4,
    "embed_dim": 16,
    "readout": "tdw",
    "image": {"in_channels": 3, "image_size": 32, "embed_dim": 32, "heads": 4,
              "mlp_ratio": 4, "depth": 1, "attn_scale": 0.125},
    "text": {"kind": "mlp", "vocab_size": 30, "context_length": 20, "position_slots": 24,
             "width": 4, "hidden": 32},
}
T = CFG["time_steps"]
COUNTS = {}


def lif(name, threshold=1.0):
    node = MultiStepLIFNode(tau=2.0, v_threshold=threshold, detach_reset=True, backend="torch")
    node.register_forward_hook(
        lambda m, i, o: COUNTS.__setitem__(name, o.reshape(o.shape[0], -1).sum(1)))
    return node


def tdw():
    return nn.Parameter(torch.tensor([-2.3026, -1.6094, -0.9163, -0.2231]).reshape(1, T, 1))


def readout(w, x):  # x [T, B, D]
    return (x.permute(1, 0, 2) * w).sum(1)


class PatchEmbed(nn.Module):
    def __init__(self, c):
        super().__init__()
        widths = [3, c // 8, c // 4, c // 2, c, c]
        for i in range(5):
            setattr(self, f"block{i}_conv", nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"block{i}_bn", nn.BatchNorm2d(widths[i + 1]))
        self.lifs = [lif(f"patch_embed.lif{i}") for i in range(1, 5)]
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):  # [T, B, C, H, W]
        t, b = x.shape[:2]
        x = x.flatten(0, 1)
        for i in range(5):
            x = getattr(self, f"block{i}_bn")(getattr(self, f"block{i}_conv")(x))
            if i in (2, 3):
                x = self.pool(x)
            if i < 4:
                x = self.lifs[i](x.reshape(t, b, *x.shape[1:])).flatten(0, 1)
        return x.reshape(t, b, *x.shape[1:])


class SSA(nn.Module):
    def __init__(self, c, heads, prefix):
        super().__init__()
        self.heads = heads
        self.in_lif = lif(f"{prefix}.in_lif")
        for n in "qkv":
            setattr(self, f"{n}_conv", nn.Conv1d(c, c, 1, bias=False))
            setattr(self, f"{n}_bn", nn.BatchNorm1d(c))
            setattr(self, f"{n}_lif", lif(f"{prefix}.{n}_lif"))
        self.attn_lif = lif(f"{prefix}.attn_lif", 0.5)
        self.proj_conv = nn.Conv1d(c, c, 1)
        self.proj_bn = nn.BatchNorm1d(c)

    def forward(self, x):  # [T, B, C, N]
        t, b, c, n = x.shape
        s = self.in_lif(x).flatten(0, 1)
        heads = []
        for name in "qkv":
            y = getattr(self, f"{name}_bn")(getattr(self, f"{name}_conv")(s))
            y = getattr(self, f"{name}_lif")(y.reshape(t, b, c, n))
            heads.append(y.transpose(-1, -2).reshape(t, b, n, self.heads, c // self.heads)
                         .permute(0, 1, 3, 2, 4))
        q, k, v = heads
        y = q @ (k.transpose(-2, -1) @ v) * CFG["image"]["attn_scale"]
        y = y.transpose(3, 4).reshape(t, b, c, n)
        y = self.attn_lif(y).flatten(0, 1)
        return self.proj_bn(self.proj_conv(y)).reshape(t, b, c, n)


class MLP(nn.Module):
    def __init__(self, c, h, prefix):
        super().__init__()
        self.lif1 = lif(f"{prefix}.lif1")
        self.mlp1_conv = nn.Conv2d(c, h, 1)
        self.mlp1_bn = nn.BatchNorm2d(h)
        self.lif2 = lif(f"{prefix}.lif2")
        self.mlp2_conv = nn.Conv2d(h, c, 1)
        self.mlp2_bn = nn.BatchNorm2d(c)

    def forward(self, x):  # [T, B, C, N]
        t, b, c, n = x.shape
        y = self.lif1(x).flatten(0, 1).unsqueeze(-1)
        y = self.mlp1_bn(self.mlp1_conv(y))
        y = self.lif2(y.reshape(t, b, -1, n)).flatten(0, 1).unsqueeze(-1)
        return self.mlp2_bn(self.mlp2_conv(y)).reshape(t, b, c, n)


class Block(nn.Module):
    def __init__(self, c, heads, h, i):
        super().__init__()
        self.attn = SSA(c, heads, f"block.{i}.attn")
        self.mlp = MLP(c, h, f"block.{i}.mlp")

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class ImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        im = CFG["image"]
        c = im["embed_dim"]
        self.weights_tensor = tdw()
        self.patch_embed = PatchEmbed(c)
        self.block = nn.ModuleList(
            [Block(c, im["heads"], c * im["mlp_ratio"], i) for i in range(im["depth"])])
        self.proj = nn.Linear(c, CFG["embed_dim"])

    def forward(self, x):
        x = self.patch_embed(x.unsqueeze(0).repeat(T, 1, 1, 1, 1))
        x = x.flatten(3)
        for blk in self.block:
            x = blk(x)
        return self.proj(readout(self.weights_tensor, x.mean(3)))


class ClipEmbedding(nn.Module):
    def __init__(self, tx):
        super().__init__()
        self.token_embedding = nn.Embedding(tx["vocab_size"], tx["width"])
        self.position_embedding = nn.Embedding(tx["position_slots"], tx["width"])


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        tx = CFG["text"]
        self.weights_tensor = tdw()
        self.clip_embedding = ClipEmbedding(tx)
        self.lif1 = lif("lif1")
        self.fc1 = nn.Linear(tx["context_length"] * tx["width"], tx["hidden"])
        self.lif2 = lif("lif2")
        self.fc2 = nn.Linear(tx["hidden"], CFG["embed_dim"])

    def forward(self, ids):
        l = ids.shape[1]
        x = self.clip_embedding.token_embedding(ids)
        x = (x + self.clip_embedding.position_embedding.weight[:l]).flatten(1)
        x = self.lif1(x.unsqueeze(0).repeat(T, 1, 1))
        x = self.lif2(self.fc1(x))
        return readout(self.weights_tensor, self.fc2(x))


def randomise_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 1.0)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.5 + 0.4)
            m.num_batches_tracked.fill_(7)


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    OUT.mkdir(parents=True, exist_ok=True)
    image, text = ImageEncoder().eval(), TextEncoder().eval()
    with torch.no_grad():
        randomise_bn(image, gen)
        text.weights_tensor.add_(0.1)
        text.fc1.weight.mul_(6.0)
        image.weights_tensor.add_(-0.1)
        side = CFG["image"]["image_size"]
        px = torch.randn(2, 3, side, side, generator=gen) * 2.0
        ids = torch.randint(0, CFG["text"]["vocab_size"], (2, 20), generator=gen)
        COUNTS.clear()
        img = image(px)
        image_counts = {f"image_spikes.{k}": v.clone() for k, v in COUNTS.items()}
        COUNTS.clear()
        txt = text(ids)
        text_counts = {f"text_spikes.{k}": v.clone() for k, v in COUNTS.items()}
    torch.save({f"module.{k}": v for k, v in image.state_dict().items()}, OUT / "image.pth")
    torch.save({"state_dict": text.state_dict(), "epoch": 3}, OUT / "text.pth.tar")
    torch.save(image.state_dict(), OUT / "image_plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in image.state_dict().items()},
                "epoch": 3}, OUT / "image_wrapped.pth.tar")
    slots = CFG["text"]["position_slots"]
    torch.save({**text.state_dict(),
                "clip_embedding.position_ids": torch.arange(slots).expand((1, -1))},
               OUT / "text_transformers.pth")
    (OUT / "config.json").write_text(json.dumps(CFG, indent=1))
    tensors = {"pixels": px, "ids": ids.to(torch.int64), "image_features": img,
               "text_features": txt, **image_counts, **text_counts}
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "io.safetensors")
    # Max-pool (kernel 3, stride 2, padding 1) forward and input gradient, odd sizes included.
    x = torch.randn(2, 3, 7, 9, generator=gen).requires_grad_()
    g = torch.randn(2, 3, 4, 5, generator=gen)
    y = nn.MaxPool2d(3, 2, 1)(x)
    (y * g).sum().backward()
    save_file({"x": x.detach(), "y": y.detach(), "g": g, "grad": x.grad},
              OUT / "maxpool.safetensors")
    for k, v in {**image_counts, **text_counts}.items():
        print(k, v.tolist())


if __name__ == "__main__":
    main()
