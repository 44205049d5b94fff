"""Reference outputs of a tiny random transformers CLIP for the Rust parity tests.

Writes tests/fixtures/clip/: a CLIP checkpoint in Hugging Face layout (weights rounded to f16
and stored as f16 so the 49408-row token table stays small; the references are computed from
the same rounded weights), test images, and reference.safetensors with input_ids, pixel
values and features. The tokenizer is CLIP's own, built from the real BPE merges.

Run: /opt/refpy/bin/python scripts/clip_fixtures.py [PATH/TO/bpe_simple_vocab_16e6.txt.gz]
"""

import gzip
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "clip")
BPE = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/bpe_simple_vocab_16e6.txt.gz"

TEXTS = [
    "a photo of a cat.",
    "A PHOTO of the Dog!!",
    "it's 2024, we'll see 3.14 dogs",
    "naïve café – über ÆØÅ 東京 🙂",
    "",
    "   spaces\tand\nnewlines   ",
    "don't stop; you're (very) 'quoted' <|endoftext|>",
    " ".join(["longword%d" % i for i in range(60)]),
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer():
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    units = bytes_to_unicode()
    vocab = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = clip_tokenizer()
    ids77 = tok(TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids20 = tok(TEXTS, padding="max_length", truncation=True, max_length=20, return_tensors="pt")

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=8,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases and LayerNorm weights away from their 0/1 init
                p.add_(0.1 * torch.randn_like(p))
            p.copy_(p.half().float())
    model.config.save_pretrained(OUT)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k},
              os.path.join(OUT, "model.safetensors"))

    # transformers 5's CLIPImageProcessor is its torchvision backend; the PIL backend's
    # preprocessing references are scripts/preprocess_fixtures.py's.
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(OUT)
    # Smooth images: resampling filters differ in detail, and noise would only measure that.
    def smooth(w, h, channels):
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        planes = [127.5 + 120 * np.sin(x / (3 + c) + y / (5 + 2 * c) + c) for c in range(channels)]
        return np.clip(np.stack(planes, -1).squeeze(-1) if channels == 1 else np.stack(planes, -1), 0, 255).round().astype(np.uint8)

    images = {
        "rgb_48x40.png": Image.fromarray(smooth(48, 40, 3), "RGB"),
        "gray_30x50.png": Image.fromarray(smooth(30, 50, 1), "L"),
        "rgba_64x64.png": Image.fromarray(smooth(64, 64, 4), "RGBA"),
        "rgb_32x32.png": Image.fromarray(smooth(32, 32, 3), "RGB"),
    }
    names = sorted(images)
    for n in names:
        images[n].save(os.path.join(OUT, n))
    pixels = proc([Image.open(os.path.join(OUT, n)) for n in names], return_tensors="pt")["pixel_values"]

    with torch.no_grad():
        text = model.get_text_features(input_ids=ids77["input_ids"], attention_mask=ids77["attention_mask"])
        image = model.get_image_features(pixel_values=pixels)
    text = getattr(text, "pooler_output", text)
    image = getattr(image, "pooler_output", image)
    # The student's input: the normalised crop shrunk as the authors do, without antialiasing.
    torch.manual_seed(1)
    interp_in = torch.randn(2, 3, 48, 40)
    interp_out = torch.nn.functional.interpolate(interp_in, size=(32, 32), mode="bilinear", align_corners=False)
    save_file({
        "interp_in": interp_in.contiguous(),
        "interp_out": interp_out.contiguous(),
        "input_ids_77": ids77["input_ids"].to(torch.int64).contiguous(),
        "input_ids_20": ids20["input_ids"].to(torch.int64).contiguous(),
        "pixel_values": pixels.contiguous(),
        "text_features": text.contiguous(),
        "image_features": image.contiguous(),
    }, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "inputs.json"), "w") as f:
        json.dump({"texts": TEXTS, "images": names}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
