"""Reference values for src/train/loss.rs computed with PyTorch: cosine distillation and the
dual loss (cross-entropy over cosine logits + lambda * KL with epsilon), with gradients.
Writes tests/fixtures/loss_torch.safetensors. Run: /opt/refpy/bin/python scripts/loss_fixtures.py"""
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "loss_torch.safetensors"
LAMBDA, EPS, SCALE = 0.7, 1e-10, 10.0

torch.manual_seed(1)
student = torch.randn(4, 8, requires_grad=True)
teacher = torch.randn(4, 8)
classes = torch.randn(5, 8)
labels = torch.tensor([0, 3, 4, 1])
teacher_probs = torch.softmax(torch.randn(4, 5) * 3, dim=-1)
teacher_probs[0, 2] = 0.0  # a zero probability exercises epsilon
teacher_probs = teacher_probs / teacher_probs.sum(-1, keepdim=True)

out = {"student": student.detach().clone(), "teacher": teacher, "classes": classes,
       "labels": labels.to(torch.int64), "teacher_probs": teacher_probs}

distill = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
(g,) = torch.autograd.grad(distill, student)
out["distill"] = distill.detach().reshape(1)
out["distill_grad"] = g

for tag, scale in (("noscale", None), ("scale", SCALE)):
    logits = F.normalize(student, dim=-1) @ F.normalize(classes, dim=-1).T
    if scale is not None:
        logits = logits * scale
    ce = F.cross_entropy(logits, labels)
    p_s = torch.softmax(logits, dim=-1)
    kl = (teacher_probs * ((teacher_probs + EPS).log() - (p_s + EPS).log())).sum(-1).mean()
    total = ce + LAMBDA * kl
    (g,) = torch.autograd.grad(total, student)
    out[f"{tag}.ce"] = ce.detach().reshape(1)
    out[f"{tag}.kl"] = kl.detach().reshape(1)
    out[f"{tag}.total"] = total.detach().reshape(1)
    out[f"{tag}.grad"] = g
save_file({k: v.contiguous() for k, v in out.items()}, OUT)
print("wrote", OUT)
