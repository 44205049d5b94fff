"""Reference values for src/train: torch.optim.Adam (AMSGrad off and on, with L2 weight decay)
and torch.optim.lr_scheduler.CosineAnnealingLR. Writes tests/fixtures/optim_torch.safetensors
and tests/fixtures/cosine_torch.json. Run: /opt/refpy/bin/python scripts/optim_fixtures.py"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
STEPS = 6
LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-8, 0.05

torch.manual_seed(0)
init = {"a": torch.randn(3, 4), "b": torch.randn(5)}
# Gradients shrink then grow so that AMSGrad's running max differs from plain Adam.
scales = [1.0, 0.3, 0.1, 2.0, 0.05, 0.5]
grads = [{k: torch.randn_like(v) * s for k, v in init.items()} for s in scales]

tensors = {f"init.{k}": v for k, v in init.items()}
for step, g in enumerate(grads):
    for k, v in g.items():
        tensors[f"grad.{step}.{k}"] = v
for amsgrad in (False, True):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = torch.optim.Adam(params.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, amsgrad=amsgrad)
    for step, g in enumerate(grads):
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        for k, p in params.items():
            tensors[f"amsgrad{int(amsgrad)}.{step}.{k}"] = p.detach().clone()
save_file(tensors, OUT / "optim_torch.safetensors")

cases = []
for base, t_max, eta_min, epochs in [(5e-3, 10, 5e-4, 25), (5e-4, 7, 0.0, 10)]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cases.append({"base_lr": base, "t_max": t_max, "eta_min": eta_min, "lrs": lrs})
meta = {"lr": LR, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "weight_decay": WD, "steps": STEPS}
(OUT / "cosine_torch.json").write_text(json.dumps({"adam": meta, "cosine": cases}, indent=1))
print("wrote", OUT)
