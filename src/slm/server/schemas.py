"""Request and response bodies. Bounds live here, so a bad field gets a 422 that names it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModelType = Literal["untrained", "basic", "cached"]


class RepetitionControls(BaseModel):
    """Penalties against repeating, and min-p (same meaning as in slm.generation.SamplingParams)."""

    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0.0, le=1.0)

    def controls(self) -> dict:
        return {k: getattr(self, k) for k in RepetitionControls.model_fields}


class PredictRequest(RepetitionControls):
    """The original playground's request, plus generation settings."""

    model_config = ConfigDict(extra="forbid")
    input_text: str = Field(min_length=1, description="the prompt")
    model_type: ModelType = "cached"
    max_new_tokens: int = Field(50, ge=1)
    temperature: float = Field(0.8, ge=0.0, le=5.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class PredictResponse(BaseModel):
    result: str
    time: float
    model_type: ModelType
    prompt_tokens: int
    generated_tokens: int
    tokens_per_second: float
    finish_reason: str
    prompt_truncated_tokens: int
    settings: dict


class CompletionRequest(RepetitionControls):
    """OpenAI's /v1/completions, the parts that mean something for one small model."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=5.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: generate past <|endoftext|> (fixed-length benchmarks)
    logprobs: int | None = None  # refused below rather than silently ignored
    echo: bool = False

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, v: int | None) -> None:
        if v is not None:
            raise ValueError("logprobs is not supported by this server yet")

    @field_validator("echo")
    @classmethod
    def no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by this server yet")
        return v

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give exactly one prompt (a string, or a list of one string)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("stop")
    @classmethod
    def stops(cls, v: str | list[str] | None) -> list[str]:
        v = [v] if isinstance(v, str) else list(v or [])
        if len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v
