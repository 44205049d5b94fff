"""Plots of docs/snn_gap.md from the health logs of `spikeclip demo --health` runs.

Usage: /opt/refpy/bin/python scripts/plot_snn_gap.py RUNS_DIR DETAIL_RUN OUT_DIR
RUNS_DIR holds one demo output per budget (`budget-1x/`, `budget-2x/`, ..., each with
`spikeclip/health.jsonl` and `scratchclip/health.jsonl`); DETAIL_RUN is the demo output whose
firing rates, gradients and TDW weights are drawn; OUT_DIR receives small PNGs.
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ["distill_text", "distill_image", "finetune"]
MODELS = [("spikeclip", "SpikeCLIP (SNN)"), ("scratchclip", "ScratchCLIP (ANN)")]


def health(run, model):
    path = run / model / "health.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def along(rows):
    """Epochs numbered across stages, so the three stages follow each other on one axis."""
    return list(range(1, len(rows) + 1))


def save(fig, out, name):
    fig.tight_layout()
    fig.savefig(out / name, dpi=80)
    plt.close(fig)


def budget_curves(runs, out):
    budgets = sorted(p for p in runs.iterdir() if p.name.startswith("budget-"))
    if not budgets:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in zip(axes, ["val_seen_top1", "val_unseen_top1"], ["seen pairs", "unseen pairs"]):
        for run in budgets:
            for (model, label), style in zip(MODELS, ["-", "--"]):
                rows = [r for r in health(run, model) if r["stage"] != "distill_text"]
                if rows:
                    ax.plot(along(rows), [100 * r[key] for r in rows], style,
                            label=f"{label} {run.name[7:]}")
        ax.axhline(100 / 24, color="grey", lw=0.8)
        ax.set_title(f"validation top-1, {title}")
        ax.set_xlabel("epoch (image distillation, then fine-tuning)")
    axes[0].set_ylabel("%")
    axes[1].legend(fontsize=7)
    save(fig, out, "snn_gap_budget.png")


def firing(run, out):
    rows = health(run, "spikeclip")
    if not rows:
        return
    layers = [f["layer"] for f in rows[0]["firing"]]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for layer in layers:
        rates = [next(f["rate"] for f in r["firing"] if f["layer"] == layer) for r in rows]
        ax.plot(along(rows), rates, label=layer if "." in layer else f"text.{layer}")
    for i, r in enumerate(rows[1:], 1):
        if r["stage"] != rows[i - 1]["stage"]:
            ax.axvline(i + 0.5, color="grey", lw=0.8)
    ax.set_xlabel("epoch (text distillation | image distillation | fine-tuning)")
    ax.set_ylabel("firing rate")
    ax.set_title(f"SpikeCLIP firing rate per LIF layer ({run.name})")
    ax.legend(fontsize=6, ncol=3)
    save(fig, out, "snn_gap_firing.png")


def weight_ratios(run, model):
    """Gradient RMS over weight RMS of every weight, last image-distillation epoch."""
    rows = [r for r in health(run, model) if r["stage"] == "distill_image"]
    last = rows[-1]["gradients"] if rows else []
    return [(g["param"], g["grad_rms"] / max(g["weight_rms"], 1e-12))
            for g in last if g["param"].endswith("weight")]


def gradients(run, out):
    fig, ax = plt.subplots(figsize=(10, 3.8))
    snn = weight_ratios(run, "spikeclip")
    ann = [r for _, r in weight_ratios(run, "scratchclip")]
    ax.semilogy(range(len(snn)), [r for _, r in snn], "o", label="SpikeCLIP (SNN), per weight")
    if ann:
        ax.axhspan(min(ann), max(ann), color="tab:orange", alpha=0.2,
                   label="ScratchCLIP (ANN): range over its weights")
    ax.set_xticks(range(len(snn)))
    ax.set_xticklabels([n.replace("image.", "") for n, _ in snn], rotation=70, fontsize=6)
    ax.set_ylabel("gradient RMS / weight RMS")
    ax.set_title("gradient reaching each weight, last image-distillation epoch")
    ax.legend(fontsize=7)
    save(fig, out, "snn_gap_gradients.png")


def tdw(run, out):
    rows = health(run, "spikeclip")
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, tower in zip(axes, ["image", "text"]):
        series = [[t for t in r["tdw"] if t["param"].startswith(tower)][0]["weights"] for r in rows]
        for step in range(len(series[0])):
            ax.plot(along(rows), [s[step] for s in series], label=f"t = {step}")
        ax.set_title(f"{tower} TDW weights")
        ax.set_xlabel("epoch (all stages)")
        ax.legend(fontsize=7)
    save(fig, out, "snn_gap_tdw.png")


def main():
    runs, detail, out = (pathlib.Path(a) for a in sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    budget_curves(runs, out)
    firing(detail, out)
    gradients(detail, out)
    tdw(detail, out)


if __name__ == "__main__":
    main()
