"""Reference preprocessing: transformers' CLIPImageProcessor pixel values, and the student's
32x32 input (F.interpolate bilinear, align_corners=False, no antialias) from them.

Writes small PNGs and tests/fixtures/clip_preprocess.safetensors.
Run: /opt/refpy/bin/python scripts/clip_preprocess_fixtures.py
"""
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
rng = np.random.default_rng(4)
proc = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
cases = {"rgb_40x30": ("RGB", 40, 30), "gray_23x51": ("L", 23, 51), "rgba_64x64": ("RGBA", 64, 64), "rgb_17x20": ("RGB", 17, 20)}
out = {}
for name, (mode, w, h) in cases.items():
    ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    # Smooth images so resampling differences stay small, as in photographs.
    base = rng.uniform(0, 255, size=(h // 4 + 2, w // 4 + 2, ch)).astype(np.uint8)
    img = Image.fromarray(base.squeeze() if ch == 1 else base, mode).resize((w, h), Image.BILINEAR)
    img.save(FIX / f"pre_{name}.png")
    pv = proc(images=Image.open(FIX / f"pre_{name}.png"), return_tensors="pt")["pixel_values"]
    out[f"{name}.pixels"] = pv[0].contiguous()
    out[f"{name}.student"] = F.interpolate(pv, size=(32, 32), mode="bilinear", align_corners=False)[0].contiguous()
save_file(out, FIX / "clip_preprocess.safetensors")
print("ok")
