"""Training settings: TrainConfig (every setting, its default and help text), a TOML --config file, the
settings a resumed run was saved with, and the recipes under the flags (a preset's, fine-tuning's)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import tomllib

from slm import checkpoint
from slm.config import ConfigError, ModelConfig, check_types, get_preset, setting
from slm.errors import SlmError
from slm.machine import COMPILE_MIN_STEPS


class TrainError(SlmError):
    """A training setting or state that cannot be used."""


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
# than a run from scratch. Measured side by side in docs/fine-tuning.md.
FINETUNE_RECIPE = {"optimizer": "muon", "muon_lr": 0.005, "lr": 3e-4, "warmup_steps": 10, "batch_size": 8}


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


def settings_under_flags(values: dict) -> dict:
    """Defaults that the config file and flags override: the fine-tuning recipe and the starting model's preset
    name with --init-from, else the preset's measured recipe."""
    name = values.get("init_from")
    if not name:
        return get_preset(values.get("preset", TrainConfig.preset)).training
    trained = checkpoint.read_config(checkpoint.resolve(name)).get("training", {})
    return {**FINETUNE_RECIPE, "preset": trained.get("preset", TrainConfig.preset)}


def check_settings(cfg: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval", "eval_windows"):
        if getattr(cfg, name) <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise TrainError(f"--lr must be positive, got {cfg.lr}")
    if cfg.loss_on not in LOSS_ON:
        raise TrainError(f"--loss-on {cfg.loss_on!r}: choose {' or '.join(LOSS_ON)}")
