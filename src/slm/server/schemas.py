"""Request and response bodies. Bounds live here, so a bad field gets a 422 that names it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


MAX_PROMPTS = 32  # prompts in one /v1/completions request
Prompt = str | list[int]  # text, or token ids


class CompletionRequest(RepetitionControls):
    """OpenAI's /v1/completions, the parts that mean something for one small model."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    # OpenAI's four forms: a string, strings, token ids, lists of token ids (read by `prompts()`).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # 0: no generation (with echo: score the prompt)
    temperature: float = Field(1.0, ge=0.0, le=5.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: generate past <|endoftext|> (fixed-length benchmarks)
    logprobs: int | None = Field(None, ge=0, le=5)  # log-probabilities of each token and its top-N rivals
    echo: bool = False  # return the prompt in front of the completion (with its log-probabilities)

    @field_validator("prompt")
    @classmethod
    def some_prompt(cls, v: str | list) -> str | list:
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt list is empty")
            prompts = v if isinstance(v[0], str | list) else [v]
            if len(prompts) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
            for i, p in enumerate(prompts):
                if not p:
                    raise ValueError(f"prompt {i} is empty")
        elif not v:
            raise ValueError("the prompt is empty")
        return v

    @field_validator("stop")
    @classmethod
    def stops(cls, v: str | list[str] | None) -> list[str]:
        v = [v] if isinstance(v, str) else list(v or [])
        if len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return v

    @model_validator(mode="after")
    def streamable(self) -> CompletionRequest:
        if self.stream and len(self.prompts()) > 1:
            raise ValueError("stream: one prompt per streamed request")
        if self.stream and self.logprobs is not None:
            raise ValueError("stream: logprobs are returned by non-streamed requests only")
        return self

    def prompts(self) -> list[Prompt]:
        """The prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        return self.prompt if isinstance(self.prompt[0], str | list) else [self.prompt]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body (``add_special_tokens`` is accepted; this tokenizer adds none)."""

    model: str | None = None
    prompt: str = Field(max_length=1_000_000)
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)
