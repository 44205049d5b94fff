"""A tiny random transformers CLIPModel (CLIP's own 49408-token vocabulary, hidden size 8,
biases and LayerNorms perturbed) and its reference features.

Writes tests/fixtures/clip_tiny/{config.json, model.safetensors (f16 weights)} and
tests/fixtures/clip_tiny_ref.safetensors. Weights are rounded to f16 before the reference
runs, so the f16 checkpoint is exact.
Run: /opt/refpy/bin/python scripts/clip_model_fixtures.py
"""
from pathlib import Path
import json
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "clip_tiny"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cfg = CLIPConfig(
    text_config=dict(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407),
    vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8),
    projection_dim=6,
)
model = CLIPModel(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.add_(torch.randn_like(p) * 0.1)
        elif "norm" in name and name.endswith("weight"):
            p.add_(torch.randn_like(p) * 0.2)
        p.copy_(p.half().float())
model.save_pretrained(OUT, safe_serialization=True)
sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
save_file(sd, OUT / "model.safetensors", metadata={"format": "pt"})
ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 269, 49407, 49407, 49407],
                    [49406, 3306, 49407, 49407, 49407, 49407, 49407, 49407, 49407, 49407]])
pixels = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    tf = model.get_text_features(input_ids=ids)
    imf = model.get_image_features(pixel_values=pixels)
    tf = getattr(tf, "pooler_output", tf)
    imf = getattr(imf, "pooler_output", imf)
save_file({"input_ids": ids.to(torch.int64), "pixel_values": pixels, "text_features": tf.contiguous(),
           "image_features": imf.contiguous()}, ROOT / "tests" / "fixtures" / "clip_tiny_ref.safetensors")
print(tf.shape, imf.shape)
