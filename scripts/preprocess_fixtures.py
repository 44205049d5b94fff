"""References from transformers' PIL-backend CLIP image processor for the Rust preprocessing tests.

Writes tests/fixtures/preprocess/: test images as PNG files (odd sizes that need upscaling,
downscaling, non-square crops; RGB, grey, grey+alpha, RGBA and palette transparency), plus the
four images of tests/fixtures/clip, and reference.safetensors with, per image in inputs.json order:
  pixels_u8         u8  [N, 3, 32, 32]  the 8-bit crop that CLIPImageProcessorPil (tiny CLIP's
                                        config) rescales and normalises: its pixel_values are
                                        (pixels_u8 * rescale_factor (f64, then f32) - mean) / std
                                        in f32, checked here bit for bit, so this stores them
                                        losslessly in a quarter of the bytes
  image_features    f32 [N, 8]          the tiny CLIP's image features of the f32 pixel values
  padded_pixels_u8  u8  [N, 3, 32, 32]  the 8-bit crop with preprocessor_padded.json, whose
                                        shortest edge (27) is below the crop (32), so the
                                        processor pads with zeros
The tiny CLIP is tests/fixtures/clip (scripts/clip_fixtures.py); its vision input decides the crop.

Run: /opt/refpy/bin/python scripts/preprocess_fixtures.py
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessorPil, CLIPModel

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP = os.path.join(HERE, "..", "tests", "fixtures", "clip")
OUT = os.path.join(HERE, "..", "tests", "fixtures", "preprocess")


def pattern(rng, w, h, channels):
    """Ramps, saturated rectangles (hard edges make bicubic overshoot and clip) and a patch of
    noise (any difference in filter weights shows there); compresses well as PNG."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([(37 * c + x * (3 + c) + y * (5 - c)) % 256 for c in range(channels)], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(1, max(2, w // 3)), y0 + rng.integers(1, max(2, h // 3))
        img[y0:y1, x0:x1] = rng.choice([0, 255], channels)
    pw, ph = min(w, 24), min(h, 24)
    px, py = rng.integers(0, w - pw + 1), rng.integers(0, h - ph + 1)
    img[py:py + ph, px:px + pw] = rng.integers(0, 256, (ph, pw, channels))
    img = np.clip(img, 0, 255).round().astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def images(rng):
    made = {}
    for w, h in [(17, 40), (40, 17), (7, 9), (250, 31), (224, 224), (300, 200), (32, 33)]:
        made[f"rgb_{w}x{h}.png"] = Image.fromarray(pattern(rng, w, h, 3), "RGB")
    made["gray_23x61.png"] = Image.fromarray(pattern(rng, 23, 61, 1), "L")
    la = pattern(rng, 20, 20, 2)
    la[:3, :, 1] = 0  # fully transparent rows
    made["gray_alpha_20x20.png"] = Image.fromarray(la, "LA")
    rgba = pattern(rng, 45, 33, 4)
    rgba[:, :4, 3] = 0
    rgba[:, 4:8, 3] = 255
    made["rgba_45x33.png"] = Image.fromarray(rgba, "RGBA")
    palette = Image.fromarray(pattern(rng, 16, 12, 3), "RGB").quantize(colors=16, dither=Image.Dither.NONE)
    palette.info["transparency"] = 3  # one palette entry transparent: PNG tRNS
    made["palette_trns_16x12.png"] = palette
    return made


def crop_u8(pixel_values, proc):
    """The 8-bit values the processor normalised, asserting they renormalise bit-exactly."""
    mean = np.array(proc.image_mean, np.float32)[:, None, None]
    std = np.array(proc.image_std, np.float32)[:, None, None]
    u8 = np.clip(np.round((pixel_values * std + mean) * 255), 0, 255).astype(np.uint8)
    again = ((u8.astype(np.float64) * proc.rescale_factor).astype(np.float32) - mean) / std
    assert np.array_equal(again, pixel_values), "pixel values are not a normalised 8-bit crop"
    return u8


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(15)
    made = images(rng)
    for name, img in made.items():
        img.save(os.path.join(OUT, name), transparency=img.info.get("transparency"))
    names = sorted(made)
    paths = [os.path.join(OUT, n) for n in names]
    clip_images = json.load(open(os.path.join(CLIP, "inputs.json")))["images"]
    names += [f"../clip/{n}" for n in clip_images]
    paths += [os.path.join(CLIP, n) for n in clip_images]

    proc = CLIPImageProcessorPil.from_pretrained(CLIP)
    padded = CLIPImageProcessorPil(size={"shortest_edge": 27}, crop_size={"height": 32, "width": 32})
    with open(os.path.join(OUT, "preprocessor_padded.json"), "w") as f:
        json.dump(padded.to_dict(), f, indent=1)
    pixels = np.stack([proc(Image.open(p), return_tensors="np")["pixel_values"][0] for p in paths])
    padded_pixels = np.stack([padded(Image.open(p), return_tensors="np")["pixel_values"][0] for p in paths])

    model = CLIPModel.from_pretrained(CLIP, dtype=torch.float32).eval()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.from_numpy(pixels))
    features = getattr(features, "pooler_output", features)
    save_file({
        "pixels_u8": torch.from_numpy(crop_u8(pixels, proc)).contiguous(),
        "image_features": features.float().contiguous(),
        "padded_pixels_u8": torch.from_numpy(crop_u8(padded_pixels, padded)).contiguous(),
    }, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "inputs.json"), "w") as f:
        json.dump({"images": names}, f, indent=1)


if __name__ == "__main__":
    main()
