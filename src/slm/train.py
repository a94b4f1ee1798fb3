"""The training loop: one process, or DDP under torchrun. Resumable, atomic, with metrics and a loss plot.

Its settings are slm.train_config's, its machine policy slm.machine's, its starting point for a fine-tune
slm.finetune's, its reports slm.reporting's; this module is the run itself (~410 lines, most of them the
Trainer, whose docstring says why it is one class).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from slm import checkpoint
from slm.config import ModelConfig, get_preset
from slm.cpu import cpu_info
from slm.data import BatchSampler, fixed_windows, load_meta, mixture, open_mask, open_tokens, trains_on_instruct
from slm.files import atomic_write_json
from slm.finetune import check_same_tokenizer, fine_tune_shape, load_starting_point, starting_weights
from slm.machine import autocast_dtype, compile_wanted, cpu_bf16_fast, resolve_device
from slm.model import GPT
from slm.optim import Optimizers, make_optimizers
from slm.outputs import NO_ROOM, write_error
from slm.reporting import flops_per_token, format_duration, hardware, peak_flops, plot_losses
from slm.run_dir import run_directory, trim_metrics
from slm.tokenizer import Tokenizer
from slm.train_config import TrainConfig, TrainError, check_settings
from slm.training_kernels import TrainingKernels


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """The schedule, as a multiple of each optimizer's peak rate (AdamW's lr, Muon's muon_lr): linear warmup,
    then cosine decay to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    done = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW (weight decay only on the blocks' matrices), or Muon on those matrices + AdamW on the rest."""
    return make_optimizers(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.muon_lr,
                           cfg.muon_momentum, device, cpu_bf16_fast(device))


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


@dataclass
class RunState:
    """What a resumed run continues from (saved in last/train_state.json)."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # wall seconds of earlier legs of this run
    best: dict = field(default_factory=lambda: {"val_loss": float("inf"), "val_bpb": None, "step": None})


class Trainer:
    """One training run: built in small steps, then :meth:`run` loops over :meth:`train_step`.

    ``settings`` is the TrainConfig, ``shape`` the ModelConfig. One class of ~295 lines because every method
    reads the same state (model, optimizer, sampler, run state); each method does one job."""

    def __init__(self, data_dir, out: Path, cfg: TrainConfig, model_overrides: dict, resume: bool,
                 progress: bool, device: torch.device, rank: int, world: int) -> None:
        check_settings(cfg)
        self.data_dir, self.out, self.settings = data_dir, out, cfg
        self.device, self.rank, self.world = device, rank, world
        self.master, self.show_progress = rank == 0, progress
        self.started = time.time()  # reset when run() starts: elapsed() and the time limit count from there
        self.starting_point = load_starting_point(cfg.init_from) if cfg.init_from else None
        self.load_data(model_overrides)
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.shape)
        if self.starting_point is not None:
            self.model.load_state_dict(starting_weights(self.starting_point, self.shape))
        self.model.to(device)
        if device.type == "cpu":  # slm's own paths for compiled bf16 steps, chosen for this CPU once
            self.model.kernels = TrainingKernels.for_cpu(cpu_info().features)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.state = RunState()
        self.restore(resume)
        self.compiled = compile_wanted(cfg.compile, cfg.max_steps, device)
        self.wrapped = self.wrap(self.model)
        self.metrics_path = out / "metrics.jsonl"
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * world * self.shape.context_length
        self.stop_signal: int | None = None

    # ---- set up ---------------------------------------------------------------------------------------
    def load_data(self, model_overrides: dict) -> None:
        cfg = self.settings
        self.meta = load_meta(self.data_dir)
        self.tokenizer = Tokenizer.load(Path(self.data_dir) / "tokenizer.json")
        if self.starting_point is not None:
            check_same_tokenizer(self.starting_point, self.data_dir, self.tokenizer)
            self.shape = fine_tune_shape(self.starting_point, model_overrides)
        else:
            values = {**get_preset(cfg.preset).config.to_dict(), **model_overrides,
                      "vocab_size": self.tokenizer.vocab_size}
            self.shape = ModelConfig.from_dict(values)
        self.amp = autocast_dtype(cfg.dtype, self.device)
        self.precision = "bf16" if self.amp else "fp32"  # this leg's: --dtype auto follows the machine
        train_tokens = open_tokens(self.data_dir, "train", self.meta)
        mask = open_mask(self.data_dir, "train") if cfg.loss_on == "story" else None
        self.sampler = BatchSampler(train_tokens, self.shape.context_length, cfg.seed, mixture(self.meta, cfg.mix),
                                    mask)
        val_tokens = open_tokens(self.data_dir, "val", self.meta)
        self.val_set = fixed_windows(val_tokens, self.shape.context_length, cfg.eval_windows)
        self.bytes_per_token = self.meta["val"]["bytes_per_token"] or self.meta["train"]["bytes_per_token"]
        if cfg.loss_on == "story" and mask is None:
            raise TrainError(f"--loss-on story: {self.data_dir} has no instruct documents (train.mask); prepare "
                             "it with slm prepare --instruct NAMES")
        # The request format the model learns (slm.instruct), saved with it: from the data when the mix samples
        # its instruct copies, or kept from the model it starts from.
        learned = self.meta["instruct"]["template"] if trains_on_instruct(self.meta, cfg.mix) else None
        self.template = learned or (self.starting_point.template if self.starting_point else None)

    def restore(self, resume: bool) -> None:
        """Continue from last/ (--resume); a new run starts in an empty directory (slm.run_dir checked it)."""
        if not resume:
            return
        last = checkpoint.find_last(self.out)
        if last is None:
            raise TrainError(f"--resume: no resumable run in {self.out} (no last/ with train_state.json)")
        saved = ModelConfig.from_dict(checkpoint.read_config(last)["model"]).to_dict()
        if saved != self.shape.to_dict():
            diff = {k: (saved.get(k), v) for k, v in self.shape.to_dict().items() if saved.get(k) != v}
            raise TrainError(f"--resume: the run in {self.out} has a different model shape {diff} (saved, now); "
                             "use the same preset and overrides, or a new --out")
        optimizers = checkpoint.saved_optimizers(last)
        if sorted(optimizers) != sorted(self.optimizer.named):
            raise TrainError(f"--resume: the run in {self.out} used optimizer(s) {', '.join(optimizers)}; "
                             "pass the same --optimizer")
        self.model.load_state_dict(load_file(str(last / "model.safetensors")))
        saved_state = checkpoint.load_train_state(last, self.optimizer.named, self.device)
        self.sampler.set_state(saved_state["sampler"])
        self.state = RunState(saved_state["step"], saved_state["tokens_seen"], saved_state["elapsed"],
                              saved_state["best"])
        if self.master:
            dropped = trim_metrics(self.out / "metrics.jsonl", self.state.step)
            replayed = f"; {dropped} later record(s) dropped from metrics.jsonl, to be replayed" if dropped else ""
            print(f"resuming {self.out} at step {self.state.step} ({self.state.tokens_seen:,} tokens seen){replayed}")

    def wrap(self, model: GPT) -> torch.nn.Module:
        """torch.compile and DDP wrappers around the model (the raw model is what gets saved)."""
        if self.compiled:
            model = torch.compile(model)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    # ---- one step -------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over the global batch (this rank's slice, in micro-batches); returns the loss."""
        cfg = self.settings
        self.optimizer.set_lr_scale(lr_multiplier(self.state.step, cfg))
        offsets = self.sampler.draw(cfg.batch_size * cfg.grad_accum * self.world)
        step_loss = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            first = (self.rank * cfg.grad_accum + micro) * cfg.batch_size
            x, y = self.sampler.windows(offsets[first : first + cfg.batch_size])
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or self.world == 1  # DDP: all-reduce on the last micro-batch only
            with (nullcontext() if sync else self.wrapped.no_sync(),
                  torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()):
                loss = self.wrapped(x, targets=y)
            (loss / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if self.world > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        value = float(step_loss)
        if not math.isfinite(value):
            raise TrainError(f"loss became {value} at step {self.state.step}; lower --lr or use --dtype fp32")
        return value

    # ---- evaluation, checkpoints, records -------------------------------------------------------------
    def elapsed(self) -> float:
        return self.state.elapsed_before + time.time() - self.started

    def summary(self, val_loss: float | None) -> dict:
        meta, cfg, best = self.meta, self.settings, self.state.best
        return {
            "data": {"dir": str(self.data_dir), "inputs": meta.get("inputs", []),
                     "train_tokens": meta["train"]["tokens"], "val_tokens": meta["val"]["tokens"],
                     "val_bytes_per_token": self.bytes_per_token},
            "preset": cfg.preset,
            "init_from": self.starting_point.record if self.starting_point else None,
            "train_config": dataclasses.asdict(cfg),
            "parameters": self.model.num_parameters(),
            "steps": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "wall_time_s": round(self.elapsed(), 1),
            "hardware": hardware(self.device, self.world),
            "precision": self.precision,
            "compiled": self.compiled,  # this leg's: unset --compile follows the run's length and the machine
            "val_loss": val_loss,
            "best_val_loss": best["val_loss"] if best["step"] is not None else None,
            "best_val_bpb": best["val_bpb"],
            "best_step": best["step"],
        }

    def record(self, entry: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def record_leg(self) -> None:
        """Where this leg (the first start, or a --resume) begins and what it runs on: a run trained in legs on
        different machines keeps each one's hardware and precision next to its points."""
        s = self.state
        self.record({"kind": "leg", "step": s.step, "tokens": s.tokens_seen, "elapsed": round(s.elapsed_before, 1),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "hardware": hardware(self.device, self.world), "precision": self.precision,
                     "compiled": self.compiled})

    def save_checkpoint(self, final: Path, write) -> None:
        """checkpoint.save_run_checkpoint, with a full disk reported as what it is and what is kept."""
        try:
            checkpoint.save_run_checkpoint(final, write)
        except OSError as e:
            if e.errno not in NO_ROOM:
                raise
            last = checkpoint.find_last(self.out)
            kept = "no checkpoint was saved yet" if last is None else \
                f"the run's checkpoint ({last.name}/, step {checkpoint.saved_step(last)}) is intact"
            raise TrainError(f"{write_error(e, final)} at step {self.state.step}; {kept}. Make room, then continue "
                             "with --resume") from e

    def save_last(self, val_loss: float | None) -> None:
        s = self.state
        train_state = {"step": s.step, "tokens_seen": s.tokens_seen, "sampler": self.sampler.state(),
                       "elapsed": self.elapsed(), "best": s.best}
        self.save_checkpoint(self.out / "last", lambda tmp: (
            checkpoint.save(self.model, self.tokenizer, tmp, training=self.summary(val_loss), template=self.template),
            checkpoint.save_train_state(tmp, self.optimizer.named, train_state)))

    def evaluate(self) -> float | None:
        """Validation loss on the fixed windows (rank 0): recorded, shown, a new best saved to best/, re-plotted."""
        if not self.master or len(self.val_set) == 0:
            return None
        val_loss = evaluate_windows(self.model, self.val_set, self.settings.batch_size, self.device, self.amp)
        bpb = val_loss / math.log(2) / self.bytes_per_token
        improved = val_loss < self.state.best["val_loss"]
        self.record_eval(val_loss, bpb, improved)
        if improved:
            self.save_best(val_loss, bpb)
        plot_losses(self.metrics_path, self.out / "loss.png", self.title())
        return val_loss

    def record_eval(self, val_loss: float, bpb: float, improved: bool) -> None:
        s = self.state
        self.record({"kind": "eval", "step": s.step, "tokens": s.tokens_seen, "val_loss": val_loss, "val_bpb": bpb,
                     "elapsed": round(self.elapsed(), 1)})
        if self.show_progress:
            tqdm.write(f"step {s.step}: val loss {val_loss:.4f}, {bpb:.3f} bits/byte{' (best so far)' * improved}")

    def save_best(self, val_loss: float, bpb: float) -> None:
        self.state.best.update(val_loss=val_loss, val_bpb=bpb, step=self.state.step)
        self.save_checkpoint(self.out / "best", lambda tmp: checkpoint.save(
            self.model, self.tokenizer, tmp, training=self.summary(val_loss), template=self.template))

    def title(self) -> str:
        what = f"fine-tuned from {self.starting_point.name}" if self.starting_point else self.settings.preset
        return f"{what}, {self.model.num_parameters() / 1e6:.1f}M parameters"

    def log_window(self, losses: list[float], seconds: float, lr: float, bar: tqdm, lines: bool) -> None:
        """A train record for the last ``log_interval`` steps: metrics.jsonl, the bar, or a plain line."""
        tps = len(losses) * self.tokens_per_step / seconds
        entry = {"kind": "train", "step": self.state.step, "tokens": self.state.tokens_seen,
                 "loss": sum(losses) / len(losses), "lr": lr, "tokens_per_s": tps, "elapsed": round(self.elapsed(), 1)}
        shown = {"loss": f"{entry['loss']:.3f}", "tok/s": f"{tps:,.0f}", "lr": f"{lr:.1e}"}
        peak = peak_flops(self.device)
        if peak:
            entry["mfu"] = tps * flops_per_token(self.shape, self.model.num_parameters()) / (peak * self.world)
            shown["mfu"] = f"{entry['mfu']:.1%}"
        if not self.master:
            return
        self.record(entry)
        bar.set_postfix(shown)
        if lines:
            fields = " | ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {self.state.step}/{self.settings.max_steps} | {fields} | {format_duration(entry['elapsed'])}",
                  flush=True)

    def should_stop(self) -> tuple[bool, bool]:
        """(stop now, because of the time limit): a signal or --max-minutes on any rank stops every rank."""
        over_time = self.settings.max_minutes > 0 and (time.time() - self.started) / 60 >= self.settings.max_minutes
        flag = torch.tensor([self.stop_signal is not None or over_time], dtype=torch.float32, device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag), over_time and self.stop_signal is None

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, out = self.settings, self.out
        if self.master:
            out.mkdir(parents=True, exist_ok=True)
            self.record_leg()
            print(f"model {self.model.num_parameters():,} parameters | {self.world} process(es) on {self.device} | "
                  f"{self.precision} | {'compiled' if self.compiled else 'eager'} | "
                  f"{self.tokens_per_step:,} tokens/step | {cfg.max_steps} steps")

        def on_signal(signum, _frame):  # finish the step, save, exit cleanly
            self.stop_signal = signum

        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.started = time.time()
        # A progress bar on a terminal; in a log file (nohup, CI) its redraws are noise, so plain lines instead.
        show_bar = self.master and self.show_progress and sys.stderr.isatty()
        lines = self.master and self.show_progress and not show_bar
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not show_bar, unit="step", dynamic_ncols=True)
        self.wrapped.train()
        losses, window_start, last_val = [], time.time(), None
        try:
            while self.state.step < cfg.max_steps:
                lr = cfg.lr * lr_multiplier(self.state.step, cfg)
                losses.append(self.train_step())
                bar.update()
                step = self.state.step
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    self.log_window(losses, time.time() - window_start, lr, bar, lines)
                    losses, window_start = [], time.time()
                stop, timed_out = self.should_stop()
                if step % cfg.eval_interval == 0 or step == cfg.max_steps or stop:
                    last_val = self.evaluate()
                    if self.master:
                        self.save_last(last_val)
                    if self.world > 1:
                        dist.barrier()
                if stop:
                    if self.master:
                        why = "time limit reached" if timed_out else "interrupted"
                        bar.write(f"{why}: saved {out / 'last'} at step {step}; continue with --resume")
                    break
        except torch.OutOfMemoryError as e:
            raise TrainError(f"out of memory with --batch-size {cfg.batch_size}; use a smaller --batch-size and "
                             f"a larger --grad-accum for the same tokens per step") from e
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        result = self.summary(last_val)
        if self.master:
            atomic_write_json(out / "summary.json", result)
        return result


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    model_overrides: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Train and return the summary; ``out_dir`` gets best/, last/, metrics.jsonl and loss.png. A new run needs
    an empty ``out_dir`` (``force``: empty it first); one process at a time holds it (slm.run_dir)."""
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
    load_meta(data_dir)  # a missing or unprepared --data is said first, before anything looks at --out
    sources = [data_dir, *([checkpoint.resolve(cfg.init_from)] if cfg.init_from else [])]
    try:
        with run_directory(Path(out_dir), sources, resume, force) if rank == 0 else nullcontext():
            trainer = Trainer(data_dir, Path(out_dir), cfg, model_overrides or {}, resume, progress, device, rank,
                              world)
            return trainer.run()
    finally:
        if ddp:
            dist.destroy_process_group()
