"""Reference CLIP token ids from transformers' CLIPTokenizer, built from CLIP's own BPE file.

Writes tests/fixtures/clip_tokenizer.json: {"max_len": L, "cases": [{"text", "input_ids"}]}.
Run: /opt/refpy/bin/python scripts/clip_tokenizer_fixtures.py
"""
import gzip, json, os, tempfile
from pathlib import Path
from transformers import CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / ".." / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return [chr(c) for c in cs]

lines = gzip.open(SHARED / "bpe_simple_vocab_16e6.txt.gz").read().decode("utf-8").split("\n")
merges = lines[1 : 49152 - 256 - 2 + 1]
vocab = bytes_to_unicode()
vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
tmp = tempfile.mkdtemp()
json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(tmp, "vocab.json"), "w"))
open(os.path.join(tmp, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), pad_token="<|endoftext|>")

texts = [
    "a photo of a cat.",
    "A PHOTO of the Dog!!",
    "it's 2024, you're 3rd; they'll've",
    "café naïve 日本語 emoji 🐱",
    "",
    "   spaced\tout\nwords  ",
    " ".join(["a very long sentence about many things"] * 15),
]
cases = []
for max_len in (20, 77):
    for t in texts:
        ids = tok(t, max_length=max_len, truncation=True, padding="max_length")["input_ids"]
        cases.append({"text": t, "max_len": max_len, "input_ids": ids})
out = ROOT / "tests" / "fixtures" / "clip_tokenizer.json"
json.dump({"cases": cases}, open(out, "w"), ensure_ascii=False)
print("wrote", out)
