"""The training loop: one process, or DDP under torchrun. Resumable, atomic, with metrics and a loss plot."""

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
from functools import cache
from pathlib import Path

import tomllib
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from slm import checkpoint
from slm.config import ConfigError, ModelConfig, check_types, get_preset, setting
from slm.cpu import bf16_pays, cpu_info
from slm.data import BatchSampler, eval_windows, load_meta, mixture, open_mask, open_tokens, trains_on_instruct
from slm.errors import SlmError
from slm.files import atomic_write, atomic_write_json
from slm.grow import grow_depth
from slm.model import GPT
from slm.optim import Optimizers, make_optimizers
from slm.outputs import NO_ROOM, write_error
from slm.run_dir import run_directory, trim_metrics
from slm.tokenizer import Tokenizer


class TrainError(SlmError):
    """A training setting or state that cannot be used."""


# torch.compile costs 20-40 s before the first step on a 2-core CPU, then saves 10-20% of every step
# (benchmarks/step-time.json, docs/training-on-cpu.md): unasked, it is on for runs long enough to earn that back.
COMPILE_MIN_STEPS = 500


LOSS_ON = ("all", "story")


@dataclass
class TrainConfig:
    """Every training setting, its default and its help text: `slm train` makes one flag of each field."""

    preset: str = setting("slm-16m", "model preset (slm info lists them)")
    batch_size: int = setting(16, "sequences per micro-batch per process")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_steps: int = setting(2000, "optimizer steps")
    lr: float = setting(1e-3, "peak learning rate (AdamW's)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule decays to lr x this")
    warmup_steps: int = setting(100, "linear warmup steps")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)")
    optimizer: str = setting("adamw", "muon: Muon for the blocks' matrices, AdamW for the rest",
                             choices=("adamw", "muon"))
    muon_lr: float = setting(0.02, "Muon's peak learning rate (lr stays AdamW's)")
    muon_momentum: float = setting(0.95, "Muon's momentum")
    mix: str = setting("", "sample inputs by weight, e.g. simple-stories=3,fables=2 (names start input file names)")
    loss_on: str = setting("all", "story: leave the instruct headers (slm prepare --instruct) out of the loss",
                           choices=LOSS_ON)
    eval_interval: int = setting(100, "steps between evaluations")
    eval_windows: int = setting(64, "validation windows scored at each evaluation (the same ones every time)")
    log_interval: int = setting(10, "steps between log lines")
    seed: int = setting(1337, "random seed")
    device: str = setting("auto", "auto | cpu | cuda | mps")
    dtype: str = setting("auto", "autocast precision; auto: bf16 where this machine runs it faster",
                         choices=("auto", "fp32", "bf16"))
    compile: bool | None = setting(None, f"torch.compile the model; unset: on for runs of {COMPILE_MIN_STEPS}+ "
                                   "steps where it works (CUDA, or a CPU with a C++ compiler)")
    threads: int = setting(0, "torch CPU threads; 0 = torch's default")
    max_minutes: float = setting(0.0, "stop and save after this much wall time (per leg with --resume); 0 = no limit")
    init_from: str = setting("", "fine-tune: start from this model's weights and shape (a checkpoint or run "
                             "directory, or 'default'), with a new optimizer and schedule; the data must use its "
                             "tokenizer (slm prepare --tokenizer MODEL)", metavar="MODEL")


# Fine-tuning (--init-from) starts from weights that are already good: a lower peak rate and a short warmup
# than a run from scratch. Measured side by side in docs/fine-tuning.md (benchmarks/finetune.py).
FINETUNE_RECIPE = {"optimizer": "muon", "muon_lr": 0.005, "lr": 3e-4, "warmup_steps": 10, "batch_size": 8}
# Settings fine-tuning can change; everything else about the shape is the model's.
FINETUNE_MAY_CHANGE = ("dropout",)


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
    if not isinstance(model, dict):
        raise ConfigError(f"--config {path}: model = {model!r}; [model] must be a table of shape settings")
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
    check_types(data, TrainConfig, f"--config {path}: ")
    check_types(model, ModelConfig, f"--config {path}: [model] ")
    return data, model


# ---- helpers --------------------------------------------------------------------------------------------
def resume_settings(out: str | Path) -> tuple[dict, dict]:
    """(train settings, model shape) a run in ``out`` was saved with, so ``--resume`` needs no flags repeated.

    ``max_minutes`` is left out: it limits one leg of a run, not the run."""
    last = checkpoint.find_last(Path(out))
    if last is None:
        return {}, {}
    saved = checkpoint.read_config(last)
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"max_minutes"}
    train_values = {k: v for k, v in saved.get("training", {}).get("train_config", {}).items() if k in known}
    model = {k: v for k, v in saved["model"].items() if k != "vocab_size"}  # the tokenizer decides the vocabulary
    return train_values, model


@dataclass(frozen=True)
class StartingPoint:
    """A trained model that a new run starts from (``--init-from``): its weights, shape and tokenizer."""

    name: str
    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    record: dict  # where it came from: its path and the training it had
    template: str | None  # the request format it learned (slm.instruct), if any


def load_starting_point(name: str) -> StartingPoint:
    model, tokenizer = checkpoint.load(name)
    path = checkpoint.resolve(name)
    saved = checkpoint.read_config(path)
    training = saved.get("training", {})
    record = {"model": str(path), "steps": training.get("steps"), "tokens_seen": training.get("tokens_seen"),
              "n_layer": model.config.n_layer}
    return StartingPoint(name, path, model.config, model.state_dict(), tokenizer, record, saved.get("template"))


def fine_tune_shape(start: StartingPoint, overrides: dict) -> ModelConfig:
    """The starting model's shape; shape flags may only repeat it, except that dropout may change and
    ``n_layer`` may grow (slm.grow: new blocks that start as the identity)."""
    def allowed(k: str, v) -> bool:
        grows = k == "n_layer" and v > start.config.n_layer
        return k in FINETUNE_MAY_CHANGE or k == "vocab_size" or grows or getattr(start.config, k) == v

    conflicts = {k: v for k, v in overrides.items() if not allowed(k, v)}
    if conflicts:
        asked = ", ".join(f"{k} {v} (the model has {getattr(start.config, k)})" for k, v in conflicts.items())
        raise TrainError(f"--init-from {start.name}: the model's shape cannot change when fine-tuning (it may only "
                         f"grow deeper: --n-layer above {start.config.n_layer}); asked for {asked}. Drop those "
                         "flags, or train a new shape from scratch")
    changes = {k: v for k, v in overrides.items() if k in (*FINETUNE_MAY_CHANGE, "n_layer")}
    return dataclasses.replace(start.config, **changes)


def starting_weights(start: StartingPoint, shape: ModelConfig) -> dict[str, torch.Tensor]:
    """The starting model's weights for ``shape``: as they are, or grown deeper (slm.grow)."""
    if shape.n_layer == start.config.n_layer:
        return start.weights
    return grow_depth(start.weights, start.config.n_layer, shape.n_layer)


def check_same_tokenizer(start: StartingPoint, data_dir: str | Path, data_tokenizer: Tokenizer) -> None:
    if data_tokenizer.same_as(start.tokenizer):
        return
    raise TrainError(f"--data {data_dir} was tokenized with another tokenizer ({data_tokenizer.describe()}) than "
                     f"--init-from {start.name} ({start.tokenizer.describe()}, {start.path}); prepare the text with "
                     f"the model's own: slm prepare INPUT --out DIR --tokenizer {start.name}")


def settings_under_flags(values: dict) -> dict:
    """Defaults that the config file and flags override: the fine-tuning recipe and the starting model's preset
    name with --init-from, else the preset's measured recipe."""
    name = values.get("init_from")
    if not name:
        return get_preset(values.get("preset", TrainConfig.preset)).training
    trained = checkpoint.read_config(checkpoint.resolve(name)).get("training", {})
    return {**FINETUNE_RECIPE, "preset": trained.get("preset", TrainConfig.preset)}


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


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA, and on CPUs where bf16 matrix products measure faster (slm.cpu); fp32 otherwise
    (auto), or as asked."""
    if name not in ("auto", "fp32", "bf16"):
        raise TrainError(f"--dtype {name!r}: choose auto, fp32 or bf16")
    if name == "fp32":
        return None
    if name == "auto" and (device.type == "mps" or (device.type == "cpu" and not bf16_pays())):
        return None
    return torch.bfloat16


@cache
def compile_works(device_type: str) -> bool:
    """Whether torch.compile builds and runs a kernel on this device here: inductor needs a C++ compiler and
    Python's headers on a CPU, triton on CUDA. A few seconds, paid only by runs that compile unasked."""
    try:
        return float(torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device_type)).sum()) == 12.0
    except Exception:  # a missing compiler, headers or triton: inductor's errors share no narrower base class
        return False


def compile_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    """--compile or --no-compile as given; unset, on where it pays: a run of COMPILE_MIN_STEPS or more, on a
    CPU or CUDA device where compiling works."""
    if cfg.compile is not None:
        return cfg.compile
    return cfg.max_steps >= COMPILE_MIN_STEPS and device.type in ("cpu", "cuda") and compile_works(device.type)


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
                           cfg.muon_momentum, device, device.type == "cpu" and bf16_pays())


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


# ---- plotting -------------------------------------------------------------------------------------------
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


def check_settings(cfg: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval", "eval_windows"):
        if getattr(cfg, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise TrainError(f"--lr must be positive, got {cfg.lr}")
    if cfg.loss_on not in LOSS_ON:
        raise TrainError(f"--loss-on {cfg.loss_on!r}: choose {' or '.join(LOSS_ON)}")


@dataclass
class RunState:
    """What a resumed run continues from (saved in last/train_state.json)."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # wall seconds of earlier legs of this run
    best: dict = field(default_factory=lambda: {"val_loss": float("inf"), "val_bpb": None, "step": None})


class Trainer:
    """One training run: built in small steps, then :meth:`run` loops over :meth:`train_step`.

    ``settings`` is the TrainConfig, ``shape`` the ModelConfig. One class of ~250 lines because every method
    reads the same state (model, optimizer, sampler, run state); each method does one job."""

    def __init__(self, data_dir, out: Path, cfg: TrainConfig, model_overrides: dict, resume: bool,
                 progress: bool, device: torch.device, rank: int, world: int) -> None:
        check_settings(cfg)
        self.data_dir, self.out, self.settings = data_dir, out, cfg
        self.device, self.rank, self.world = device, rank, world
        self.master, self.show_progress = rank == 0, progress
        self.started = time.time()  # reset when run() starts: elapsed() and the time limit count from there
        self.start = load_starting_point(cfg.init_from) if cfg.init_from else None
        self.load_data(model_overrides)
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.shape)
        if self.start is not None:
            self.model.load_state_dict(starting_weights(self.start, self.shape))
        self.model.to(device)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.state = RunState()
        self.restore(resume)
        self.compiled = compile_wanted(cfg, device)
        self.wrapped = self.wrap(self.model)
        self.metrics_path = out / "metrics.jsonl"
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * world * self.shape.context_length
        self.stop_signal: int | None = None

    # ---- set up ---------------------------------------------------------------------------------------
    def load_data(self, model_overrides: dict) -> None:
        cfg = self.settings
        self.meta = load_meta(self.data_dir)
        self.tokenizer = Tokenizer.load(Path(self.data_dir) / "tokenizer.json")
        if self.start is not None:
            check_same_tokenizer(self.start, self.data_dir, self.tokenizer)
            self.shape = fine_tune_shape(self.start, model_overrides)
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
        self.val_set = eval_windows(val_tokens, self.shape.context_length, cfg.eval_windows)
        self.bytes_per_token = self.meta["val"]["bytes_per_token"] or self.meta["train"]["bytes_per_token"]
        if cfg.loss_on == "story" and mask is None:
            raise TrainError(f"--loss-on story: {self.data_dir} has no instruct documents (train.mask); prepare "
                             "it with slm prepare --instruct NAMES")
        # The request format the model learns (slm.instruct), saved with it: from the data when the mix samples
        # its instruct copies, or kept from the model it starts from.
        learned = self.meta["instruct"]["template"] if trains_on_instruct(self.meta, cfg.mix) else None
        self.template = learned or (self.start.template if self.start else None)

    def restore(self, resume: bool) -> None:
        """Continue from last/ (--resume), or make sure we are not about to overwrite a run."""
        last = checkpoint.find_last(self.out)
        if not resume:  # slm.run_dir has checked that a new run starts in an empty directory
            return
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
            "init_from": self.start.record if self.start else None,
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
        what = f"fine-tuned from {self.start.name}" if self.start else self.settings.preset
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
    sources = [data_dir, *([checkpoint.resolve(cfg.init_from)] if cfg.init_from else [])]
    try:
        with run_directory(Path(out_dir), sources, resume, force) if rank == 0 else nullcontext():
            trainer = Trainer(data_dir, Path(out_dir), cfg, model_overrides or {}, resume, progress, device, rank,
                              world)
            return trainer.run()
    finally:
        if ddp:
            dist.destroy_process_group()
