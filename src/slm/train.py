"""The training loop: one process, or DDP under torchrun. Resumable, atomic, with metrics and a loss plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import tomllib
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from slm import checkpoint
from slm.config import ConfigError, ModelConfig, get_preset
from slm.data import BatchSampler, eval_windows, load_meta, open_tokens
from slm.files import atomic_write, atomic_write_json
from slm.model import GPT
from slm.optim import Optimizers, make_optimizers
from slm.tokenizer import Tokenizer


class TrainError(ValueError):
    """A training setting or state that cannot be used."""


@dataclass
class TrainConfig:
    preset: str = "slm-16m"
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak learning rate (lr above stays AdamW's)
    muon_momentum: float = 0.95
    eval_interval: int = 100
    eval_windows: int = 64  # validation windows scored at each evaluation (the same ones every time)
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    threads: int = 0  # torch CPU threads; 0 = torch's default
    max_minutes: float = 0.0  # stop (and save) after this much wall time; 0 = no limit


def load_config_file(path: str | Path) -> tuple[dict, dict]:
    """Read a TOML file: top-level keys are TrainConfig fields, a [model] table overrides ModelConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: invalid TOML ({e})") from e
    model = data.pop("model", {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))}, "
                          "and a [model] table)")
    model_known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(model) - model_known)
    if bad:
        raise ConfigError(f"--config {path}: unknown [model] key(s) {', '.join(bad)} "
                          f"(known: {', '.join(sorted(model_known))})")
    return data, model


# ---- helpers --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainError("--device mps: Apple MPS is not available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise TrainError(f"--device {name!r}: choose auto, cpu, cuda or mps")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is far slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA, and on CPUs with native bf16; fp32 otherwise (auto), or as asked."""
    if name not in ("auto", "fp32", "bf16"):
        raise TrainError(f"--dtype {name!r}: choose auto, fp32 or bf16")
    if name == "fp32":
        return None
    if name == "auto" and (device.type == "mps" or (device.type == "cpu" and not cpu_has_bf16())):
        return None
    return torch.bfloat16


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW (weight decay only on the blocks' matrices), or Muon on those matrices + AdamW on the rest."""
    return make_optimizers(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.muon_lr,
                           cfg.muon_momentum, device, cpu_has_bf16())


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
        what = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        if world > 1:
            what = f"{world} processes x {what}"
    return what


# ---- resume state (no pickle: tensors in safetensors, the rest in JSON) ----------------------------------
def save_train_state(path: Path, optimizers: Optimizers, state: dict) -> None:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    saved = {}
    for opt_name, optimizer in optimizers.named.items():
        opt = optimizer.state_dict()
        steps = {}
        for idx, s in opt["state"].items():
            for key, value in s.items():
                if key == "step":
                    steps[str(idx)] = float(value)
                else:
                    tensors[f"opt.{opt_name}.{idx}.{key}"] = value.detach().cpu().contiguous()
        saved[opt_name] = {"steps": steps, "param_groups": opt["param_groups"]}
    atomic_write(path / "train_state.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(path / "train_state.json", {**state, "optimizers": saved})


def load_train_state(path: Path, optimizers: Optimizers, device: torch.device) -> dict:
    state = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    saved = state.get("optimizers", {})
    if sorted(saved) != sorted(optimizers.named):
        raise TrainError(f"--resume: the run in {path.parent} used optimizer(s) {', '.join(saved) or 'unknown'}; "
                         f"pass the same --optimizer")
    tensors = load_file(str(path / "train_state.safetensors"))
    for opt_name, optimizer in optimizers.named.items():
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith(f"opt.{opt_name}."):
                idx, name = key[len(f"opt.{opt_name}.") :].split(".", 1)
                opt_state.setdefault(int(idx), {})[name] = value.to(device)
        for idx, step in saved[opt_name]["steps"].items():
            opt_state.setdefault(int(idx), {})["step"] = torch.tensor(step)
        optimizer.load_state_dict({"state": opt_state, "param_groups": saved[opt_name]["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def swap_in(new: Path, final: Path) -> None:
    """Replace directory ``final`` by ``new``; at every moment ``final`` or ``final.old`` is complete."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)


def find_last(out: Path) -> Path | None:
    for candidate in (out / "last", out / "last.old"):
        if (candidate / "train_state.json").is_file():
            return candidate
    return None


# ---- plotting -------------------------------------------------------------------------------------------
def plot_losses(metrics_path: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        m = json.loads(line)
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


# ---- the loop -------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_windows(model: GPT, windows: torch.Tensor, batch_size: int, device: torch.device,
                     amp: torch.dtype | None) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(w[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += w[:, 1:].numel()
    model.train()
    return total / count


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    model_overrides: dict | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train and return the summary; ``out_dir`` gets best/, last/, metrics.jsonl and loss.png."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if ddp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    try:
        return _train(data_dir, Path(out_dir), cfg, model_overrides or {}, resume, progress, device, rank, world)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(data_dir, out: Path, cfg: TrainConfig, model_overrides: dict, resume: bool, progress: bool,
           device: torch.device, rank: int, world: int) -> dict:
    master = rank == 0
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval", "eval_windows"):
        if getattr(cfg, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise TrainError(f"--lr must be positive, got {cfg.lr}")
    meta = load_meta(data_dir)
    tokenizer = Tokenizer.load(Path(data_dir) / "tokenizer.json")
    preset = get_preset(cfg.preset)
    mvalues = {**preset.config.to_dict(), **model_overrides, "vocab_size": tokenizer.vocab_size}
    config = ModelConfig.from_dict(mvalues)
    amp = autocast_dtype(cfg.dtype, device)

    train_tokens = open_tokens(data_dir, "train", meta)
    val_tokens = open_tokens(data_dir, "val", meta)
    sampler = BatchSampler(train_tokens, config.context_length, cfg.seed)
    val_set = eval_windows(val_tokens, config.context_length, cfg.eval_windows)
    bytes_per_token = meta["val"]["bytes_per_token"] or meta["train"]["bytes_per_token"]

    torch.manual_seed(cfg.seed)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, cfg, device)
    step, tokens_seen, elapsed_before, best = 0, 0, 0.0, {"val_loss": float("inf"), "val_bpb": None, "step": None}

    last = find_last(out)
    if resume:
        if last is None:
            raise TrainError(f"--resume: no resumable run in {out} (no last/ with train_state.json)")
        saved = ModelConfig.from_dict(checkpoint.read_config(last)["model"]).to_dict()
        if saved != config.to_dict():
            diff = {k: (saved.get(k), v) for k, v in config.to_dict().items() if saved.get(k) != v}
            raise TrainError(f"--resume: the run in {out} has a different model shape {diff} (saved, now); "
                             "use the same preset and overrides, or a new --out")
        model.load_state_dict(load_file(str(last / "model.safetensors")))
        state = load_train_state(last, optimizer, device)
        sampler.set_state(state["sampler"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        elapsed_before, best = state["elapsed"], state["best"]
        if master:
            print(f"resuming {out} at step {step} ({tokens_seen:,} tokens seen)")
    elif last is not None and master:
        raise TrainError(f"{out} already holds a run; add --resume to continue it or choose another --out")

    n_params = model.num_parameters()
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    stop = {"signal": None}

    def on_signal(signum, _frame):  # finish the step, save, exit cleanly
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    global_batch = cfg.batch_size * cfg.grad_accum * world
    tokens_per_step = global_batch * config.context_length
    peak = peak_flops(device)
    fpt = flops_per_token(config, n_params)
    metrics_path = out / "metrics.jsonl"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"model {n_params:,} parameters | {world} process(es) on {device} | "
              f"{'bf16' if amp else 'fp32'} | {tokens_per_step:,} tokens/step | {cfg.max_steps} steps")

    def summary(val_loss: float | None) -> dict:
        return {
            "data": {"dir": str(data_dir), "inputs": meta.get("inputs", []), "train_tokens": meta["train"]["tokens"],
                     "val_tokens": meta["val"]["tokens"], "val_bytes_per_token": bytes_per_token},
            "preset": cfg.preset,
            "train_config": dataclasses.asdict(cfg),
            "parameters": n_params,
            "steps": step,
            "tokens_seen": tokens_seen,
            "wall_time_s": round(elapsed_before + time.time() - started, 1),
            "hardware": hardware(device, world),
            "val_loss": val_loss,
            "best_val_loss": best["val_loss"] if best["step"] is not None else None,
            "best_val_bpb": best["val_bpb"],
            "best_step": best["step"],
        }

    def save_last(val_loss: float | None) -> None:
        tmp = out / "last.new"
        if tmp.exists():
            shutil.rmtree(tmp)
        checkpoint.save(raw_model, tokenizer, tmp, training=summary(val_loss))
        save_train_state(tmp, optimizer, {"step": step, "tokens_seen": tokens_seen, "sampler": sampler.state(),
                                          "elapsed": elapsed_before + time.time() - started, "best": best})
        swap_in(tmp, out / "last")

    def run_eval() -> float | None:
        if not master or len(val_set) == 0:
            return None
        val_loss = evaluate_windows(raw_model, val_set, cfg.batch_size, device, amp)
        bpb = val_loss / math.log(2) / bytes_per_token
        record = {"kind": "eval", "step": step, "tokens": tokens_seen, "val_loss": val_loss, "val_bpb": bpb,
                  "elapsed": round(elapsed_before + time.time() - started, 1)}
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if progress:
            better = " (best so far)" if val_loss < best["val_loss"] else ""
            tqdm.write(f"step {step}: val loss {val_loss:.4f}, {bpb:.3f} bits/byte{better}")
        if val_loss < best["val_loss"]:
            best.update(val_loss=val_loss, val_bpb=bpb, step=step)
            tmp = out / "best.new"
            if tmp.exists():
                shutil.rmtree(tmp)
            checkpoint.save(raw_model, tokenizer, tmp, training=summary(val_loss))
            swap_in(tmp, out / "best")
        plot_losses(metrics_path, out / "loss.png", f"{cfg.preset}, {n_params / 1e6:.1f}M parameters")
        return val_loss

    started = time.time()
    # A progress bar on a terminal; in a log file (nohup, CI) its redraws are noise, so plain lines instead.
    show_bar = master and progress and sys.stderr.isatty()
    log_lines = master and progress and not show_bar
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True)
    model.train()
    window_loss, window_steps, window_start = 0.0, 0, time.time()
    last_val: float | None = None
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            optimizer.set_lr_scale(lr / cfg.lr)
            offsets = sampler.draw(global_batch)
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                first = (rank * cfg.grad_accum + micro) * cfg.batch_size
                x, y = sampler.windows(offsets[first : first + cfg.batch_size])
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or world == 1
                ctx = nullcontext() if sync else model.no_sync()
                with ctx, torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                    logits = model(x)
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / cfg.grad_accum).backward()
                step_loss += loss.detach() / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            if world > 1:
                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            step += 1
            tokens_seen += tokens_per_step
            loss_value = float(step_loss)
            if not math.isfinite(loss_value):
                raise TrainError(f"loss became {loss_value} at step {step}; lower --lr or use --dtype fp32")
            window_loss += loss_value
            window_steps += 1
            bar.update()
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                dt = time.time() - window_start
                tps = window_steps * tokens_per_step / dt
                record = {"kind": "train", "step": step, "tokens": tokens_seen, "loss": window_loss / window_steps,
                          "lr": lr, "tokens_per_s": tps, "elapsed": round(elapsed_before + time.time() - started, 1)}
                post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{tps:,.0f}", "lr": f"{lr:.1e}"}
                if peak:
                    record["mfu"] = tps * fpt / (peak * world)
                    post["mfu"] = f"{record['mfu']:.1%}"
                if master:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(post)
                    if log_lines:
                        print(f"step {step}/{cfg.max_steps} | " + " | ".join(f"{k} {v}" for k, v in post.items())
                              + f" | {format_duration(record['elapsed'])}", flush=True)
                window_loss, window_steps, window_start = 0.0, 0, time.time()
            over_time = cfg.max_minutes > 0 and (time.time() - started) / 60 >= cfg.max_minutes
            flags = torch.tensor([stop["signal"] is not None or over_time], dtype=torch.float32, device=device)
            if world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if step % cfg.eval_interval == 0 or step == cfg.max_steps or bool(flags):
                last_val = run_eval()
                if master:
                    save_last(last_val)
                if world > 1:
                    dist.barrier()
            if bool(flags):
                if master:
                    why = "time limit reached" if over_time and stop["signal"] is None else "interrupted"
                    bar.write(f"{why}: saved {out / 'last'} at step {step}; continue with --resume")
                break
    except torch.OutOfMemoryError as e:
        raise TrainError(f"out of memory with --batch-size {cfg.batch_size}; use a smaller --batch-size and "
                         f"a larger --grad-accum for the same tokens per step") from e
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    result = summary(last_val)
    if master:
        atomic_write_json(out / "summary.json", result)
    return result

