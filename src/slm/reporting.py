"""What a training run reports besides its losses: the hardware it runs on, the figures of MFU, durations,
and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slm.config import ModelConfig
from slm.cpu import cpu_info
from slm.files import atomic_write

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(config: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as in nanoGPT): 6N plus the attention term."""
    return 6 * n_params + 12 * config.n_layer * config.d_model * config.context_length


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        what = f"{world}x {torch.cuda.get_device_name(device)}"
    else:
        info = cpu_info()
        features = f" ({', '.join(info.features)})" if info.features else ""
        what = f"{info.model}{features}, {torch.get_num_threads()} threads"
        if world > 1:
            what = f"{world} processes x {what}"
    return what


def plot_losses(metrics_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        m = json.loads(line)
        if m["kind"] != "leg":  # a leg's start carries no loss
            (val if m["kind"] == "eval" else train).append(m)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([m["tokens"] / 1e6 for m in train], [m["loss"] for m in train], label="train", lw=1, alpha=0.8)
    if val:
        ax.plot([m["tokens"] / 1e6 for m in val], [m["val_loss"] for m in val], "o-", label="validation", ms=3)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
