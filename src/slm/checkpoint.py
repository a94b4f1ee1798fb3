"""Save and load a model directory: config.json + model.safetensors + tokenizer.json (no pickle anywhere)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from slm.config import ConfigError, ModelConfig
from slm.errors import SlmError
from slm.files import atomic_write, atomic_write_json
from slm.model import GPT
from slm.tokenizer import Tokenizer, TokenizerError

FORMAT = "slm-checkpoint"
DEFAULT_MODEL = "slm-16m-storyteller"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


class CheckpointError(SlmError):
    """A checkpoint directory is missing, incomplete, corrupt, or not in our format."""


def models_dir() -> Path:
    """The repository's bundled ``models/`` directory (``SLM_MODELS_DIR`` overrides it)."""
    env = os.environ.get("SLM_MODELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


def resolve(name_or_path: str | Path) -> Path:
    """``"default"`` -> the bundled model (or ``SLM_MODEL``); a name in models/ -> that; else a path."""
    name = str(name_or_path)
    if name == "default":
        env = os.environ.get("SLM_MODEL")
        if env and env != "default":
            return Path(env)
        name = DEFAULT_MODEL
    path = Path(name)
    if not path.exists() and (models_dir() / name).is_dir():
        return models_dir() / name
    return run_checkpoint(path) or path


def run_checkpoint(path: Path) -> Path | None:
    """For a training run directory (``slm train --out``): its best/ checkpoint if there is one, else last/."""
    if (path / "model.safetensors").is_file():
        return None
    for name in ("best", "last", "last.old"):
        if (path / name / "model.safetensors").is_file():
            return path / name
    return None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e


def save(
    model: GPT,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    training: dict | None = None,
    dtype: torch.dtype | None = None,
    template: str | None = None,
) -> Path:
    """Write a checkpoint directory; ``dtype`` (e.g. torch.float16) shrinks the stored weights; ``template``
    names the request format the model was trained on (slm.instruct.TEMPLATE), None for plain text only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_tensors(tensors, tmp, metadata={"format": "pt"}))
    tokenizer.save(out / "tokenizer.json")
    meta = {
        "format": FORMAT,
        "version": 1,
        "model": model.config.to_dict(),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
        "weights_dtype": str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
        "template": template,
        "training": training or {},
    }
    atomic_write_json(out / "config.json", meta)
    return out


def read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json; a checkpoint directory holds config.json, "
                              "model.safetensors and tokenizer.json")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{cfg_path}: not an slm checkpoint config (no 'model' section)")
    return meta


def template(name_or_path: str | Path) -> str | None:
    """The request format a model was trained on (``slm prepare --instruct``), or None (plain text only)."""
    return read_config(resolve(name_or_path)).get("template")


def checkpoint_dir(name_or_path: str | Path) -> Path:
    """The checkpoint directory a name stands for, refused when it is missing, a file or pickle weights."""
    path = resolve(name_or_path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path} is a pickle file; slm refuses pickle because loading it can run code. "
                                  "Convert it to a checkpoint directory with model.safetensors")
        raise CheckpointError(f"{path} is a file; give the checkpoint directory that contains it")
    if not path.is_dir():
        hint = " (the bundled model is missing from models/)" if str(name_or_path) == "default" else ""
        raise CheckpointError(f"checkpoint directory not found: {path}{hint}")
    if not (path / "model.safetensors").is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(f"{path} holds pickle weights ({', '.join(pickles)}) and no model.safetensors; "
                                  "slm refuses pickle because loading it can run code")
        raise CheckpointError(f"{path}: model.safetensors is missing")
    return path


def model_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(read_config(path)["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e


def load_tokenizer(path: Path, config: ModelConfig) -> Tokenizer:
    try:
        tokenizer = Tokenizer.load(path / "tokenizer.json")
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, model only {config.vocab_size}")
    return tokenizer


def weight_shapes(weights: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from a safetensors file's header (no weights read; safetensors checks that the file
    holds all the data its header describes)."""
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read weights, the file is damaged or cut short ({e})") from e


def expected_shapes(config: ModelConfig) -> dict[str, list[int]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {k: list(v.shape) for k, v in GPT(config).state_dict().items()}


def check_shapes(config: ModelConfig, found: dict[str, list[int]], weights: Path) -> None:
    """Refuse weights that do not fit config.json, naming the tensors and their shapes."""
    wanted = expected_shapes(config)
    problems = [f"{k} is {found[k]} in the weights but {v} by config.json" for k, v in wanted.items()
                if k in found and found[k] != v]
    missing, unexpected = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    problems += [f"missing {', '.join(missing[:3])}{' ...' * (len(missing) > 3)}"] if missing else []
    problems += [f"unexpected {', '.join(unexpected[:3])}{' ...' * (len(unexpected) > 3)}"] if unexpected else []
    if problems:
        hint = f" (config.json: vocab_size {config.vocab_size}, d_model {config.d_model}, n_layer {config.n_layer})"
        raise CheckpointError(f"{weights} does not match config.json: {'; '.join(problems[:3])}{hint}")


def check(name_or_path: str | Path = "default") -> Path:
    """What load() checks, without reading the weights (for `slm serve` before it starts); returns the path."""
    path = checkpoint_dir(name_or_path)
    config = model_config(path)
    load_tokenizer(path, config)
    check_shapes(config, weight_shapes(path / "model.safetensors"), path / "model.safetensors")
    return path


def load(name_or_path: str | Path = "default", device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Load a checkpoint directory (or ``"default"``, the bundled model) as an fp32 model in eval mode."""
    path = checkpoint_dir(name_or_path)
    weights = path / "model.safetensors"
    config = model_config(path)
    tokenizer = load_tokenizer(path, config)
    check_shapes(config, weight_shapes(weights), weights)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read weights ({e})") from e
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval(), tokenizer


# ---- run directories: best/ and last/ swapped in whole, and last/'s resume state ---------------------------
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


def save_run_checkpoint(final: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a fresh ``<final>.new`` directory, then swap it in for ``final``."""
    tmp = final.with_name(final.name + ".new")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the room it took, on a full disk
        raise
    swap_in(tmp, final)


def find_last(run: Path) -> Path | None:
    """The run's resumable checkpoint: last/, or last.old/ if a swap was interrupted."""
    for candidate in (run / "last", run / "last.old"):
        if (candidate / "train_state.json").is_file():
            return candidate
    return None


def save_train_state(path: Path, optimizers: dict[str, torch.optim.Optimizer], state: dict) -> None:
    """Resume state without pickle: optimizer tensors and torch RNG in safetensors, the rest in JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    saved = {}
    for opt_name, optimizer in optimizers.items():
        opt = optimizer.state_dict()
        steps = {}
        for idx, param_state in opt["state"].items():
            for key, value in param_state.items():
                if key == "step":
                    steps[str(idx)] = float(value)
                else:
                    tensors[f"opt.{opt_name}.{idx}.{key}"] = value.detach().cpu().contiguous()
        saved[opt_name] = {"steps": steps, "param_groups": opt["param_groups"]}
    atomic_write(path / "train_state.safetensors", lambda tmp: save_tensors(tensors, tmp))
    atomic_write_json(path / "train_state.json", {**state, "optimizers": saved})


def saved_step(path: Path) -> int:
    return json.loads((path / "train_state.json").read_text(encoding="utf-8"))["step"]


def saved_optimizers(path: Path) -> list[str]:
    state = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    return list(state.get("optimizers", {}))


def load_train_state(path: Path, optimizers: dict[str, torch.optim.Optimizer], device: torch.device) -> dict:
    """Restore the optimizers and torch's RNG from ``path``; return the rest of the saved state."""
    state = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "train_state.safetensors"))
    for opt_name, optimizer in optimizers.items():
        prefix = f"opt.{opt_name}."
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, name = key[len(prefix) :].split(".", 1)
                opt_state.setdefault(int(idx), {})[name] = value.to(device)
        for idx, step in state["optimizers"][opt_name]["steps"].items():
            opt_state.setdefault(int(idx), {})["step"] = torch.tensor(step)
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizers"][opt_name]["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state
