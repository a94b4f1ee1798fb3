"""Request and response bodies. Bounds live here (the sampling ones come from slm.generation), so a bad
field gets a 422 that names it and the OpenAPI document says what is accepted."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from slm.generation import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MIN_P_RANGE,
    PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
    TEMPERATURE_MAX,
    TEMPERATURE_RULE,
    SamplingParams,
    temperature_ok,
)
from slm.instruct import (
    FEATURES,
    MAX_WORD_CHARS,
    MAX_WORDS,
    WORD_BOOST_RANGE,
    WORD_RE,
    StoryRequest,
    make_request,
)

# The model variants the server runs (server/app.py builds them): the trained model with its KV cache (what
# /v1/completions serves), the same model recomputing every token, and a random model of its shape.
ModelType = Literal["untrained", "basic", "cached"]
COMPLETIONS_VARIANT: ModelType = "cached"
Word = Annotated[str, Field(min_length=1, max_length=MAX_WORD_CHARS, pattern=f"^{WORD_RE.pattern}$",
                            description="one word: letters, with an apostrophe or hyphen inside")]
Feature = Literal[tuple(FEATURES)]


def encodable(text: str) -> str:
    """Refuse a lone surrogate (JSON can carry "\\ud800"; UTF-8, and so the tokenizer, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}; "
                         "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]
EMPTY_PROMPT = "is empty: give text to continue, or words (or features) for a story"


def empty_needs_a_request(prompt: object, info: ValidationInfo) -> object:
    """A validator for a prompt field: an empty text only with a story request (validated before it)."""
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    if "" in texts and not (info.data.get("words") or info.data.get("features")):
        raise ValueError(EMPTY_PROMPT)
    return prompt

StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS), AfterValidator(encodable)]
def temperature(t: float) -> float:
    if not temperature_ok(t):
        raise ValueError(TEMPERATURE_RULE)
    return t


Temperature = Annotated[float, Field(ge=0.0, le=TEMPERATURE_MAX, allow_inf_nan=False,
                                     description=f"sampling temperature: {TEMPERATURE_RULE}"),
                        AfterValidator(temperature)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class RepetitionControls(BaseModel):
    """Penalties against repeating, and min-p (same meaning as in slm.generation.SamplingParams)."""

    frequency_penalty: float = Field(SamplingParams.frequency_penalty, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
                                     allow_inf_nan=False)
    presence_penalty: float = Field(SamplingParams.presence_penalty, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1],
                                    allow_inf_nan=False)
    repetition_penalty: float = Field(SamplingParams.repetition_penalty, ge=REPETITION_PENALTY_RANGE[0],
                                      le=REPETITION_PENALTY_RANGE[1], allow_inf_nan=False)
    min_p: float | None = Field(SamplingParams.min_p, ge=MIN_P_RANGE[0], le=MIN_P_RANGE[1], allow_inf_nan=False)

    def controls(self) -> dict:
        return {k: getattr(self, k) for k in RepetitionControls.model_fields}


class StoryFields(BaseModel):
    """Ask for a story that uses these words (and has these features); for models trained with
    `slm prepare --instruct`. The prompt then starts with the request's header (slm.instruct)."""

    words: list[Word] = Field(default_factory=list, max_length=MAX_WORDS)
    features: list[Feature] = Field(default_factory=list, max_length=len(FEATURES))
    word_boost: float = Field(SamplingParams.word_boost, ge=WORD_BOOST_RANGE[0], le=WORD_BOOST_RANGE[1],
                              allow_inf_nan=False, description="with words: logit added to a requested word's next "
                              "token until the story uses it (0 = the model alone)")

    def story_request(self) -> StoryRequest:
        return make_request(self.words, self.features)

    def guidance(self) -> dict:
        """SamplingParams' fields that steer decoding toward the words."""
        return {"words": tuple(self.words), "word_boost": self.word_boost}


class PredictRequest(RepetitionControls, StoryFields):
    """The original playground's request, plus generation settings."""

    model_config = ConfigDict(extra="forbid")
    input_text: TextPrompt = Field(description="the prompt (empty: with words or features only)")
    model_type: ModelType = "cached"
    # The upper bound of max_new_tokens is the server's setting (SLM_MAX_NEW_TOKENS), checked per request.
    max_new_tokens: int = Field(SamplingParams.max_new_tokens, ge=1)
    temperature: Temperature = SamplingParams.temperature
    top_k: int | None = Field(None, ge=0)
    top_p: TopP | None = None
    seed: Seed | None = None

    _input_text = field_validator("input_text")(empty_needs_a_request)


class PredictResponse(BaseModel):
    result: str
    prompt: str = Field(description="the text the model continued: input_text, after the header built from "
                        "words and features when they are given")
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
# OpenAI's four forms, each non-empty (the token ids' upper bound, the vocabulary, is checked per model); a
# text may be empty when words or features are asked for: the request's header is then the whole prompt.
TextPrompt = Annotated[str, AfterValidator(encodable)]
IdsPrompt = Annotated[list[TokenId], Field(min_length=1)]


def prompt_form(v: object) -> str:
    """Which of the four forms a prompt is in, so a bad one is reported against that form alone."""
    if isinstance(v, str):
        return "text"
    first = v[0] if isinstance(v, list) and v else None
    return "texts" if isinstance(first, str) else "id_lists" if isinstance(first, list) else "ids"


PromptField = Annotated[
    Annotated[TextPrompt, Tag("text")]
    | Annotated[list[TextPrompt], Field(min_length=1, max_length=MAX_PROMPTS), Tag("texts")]
    | Annotated[IdsPrompt, Tag("ids")]
    | Annotated[list[IdsPrompt], Field(min_length=1, max_length=MAX_PROMPTS), Tag("id_lists")],
    Discriminator(prompt_form),
]


StopField = Annotated[
    Annotated[StopText, Tag("text")] | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS), Tag("texts")],
    Discriminator(lambda v: "text" if isinstance(v, str) else "texts"),
]


class CompletionRequest(RepetitionControls, StoryFields):
    """OpenAI's /v1/completions, the parts that mean something for one small model."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str | None = None
    # OpenAI's four forms: a string, strings, token ids, lists of token ids (read by `prompts()`).
    prompt: PromptField
    # OpenAI's defaults (16 tokens, temperature 1, top_p 1), not SamplingParams': clients written for OpenAI
    # expect them. max_tokens 0: no generation (with echo: score the prompt).
    max_tokens: int = Field(16, ge=0)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int | None = Field(None, ge=0)
    stop: StopField | None = None
    seed: Seed | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: generate past <|endoftext|> (fixed-length benchmarks)
    logprobs: int | None = Field(None, ge=0, le=5)  # log-probabilities of each token and its top-N rivals
    echo: bool = False  # return the prompt in front of the completion (with its log-probabilities)

    _prompt = field_validator("prompt")(empty_needs_a_request)

    @field_validator("stop")
    @classmethod
    def stops(cls, v: str | list[str] | None) -> list[str]:
        return [v] if isinstance(v, str) else list(v or [])

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
    prompt: Text = Field(max_length=1_000_000)
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1_000_000)


class FieldError(BaseModel):
    field: str = Field(description="the field, dotted (`prompt.0`), or `body` for the body as a whole")
    message: str


class ErrorResponse(BaseModel):
    """Every error the API answers (4xx, 5xx): one line for people, and per-field problems for programs."""

    detail: str
    errors: list[FieldError] = []
