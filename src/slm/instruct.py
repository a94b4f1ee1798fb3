"""Stories that follow a request: the "Words / Features / Story" format, in the spirit of TinyStories-Instruct.

A story becomes a header of fields, then the story::

    Words: bottle, queen, loud
    Features: Dialogue
    Story:
    Once upon a time ...

slm writes such documents from any story corpus itself (`slm prepare --instruct`): the words are content words
drawn from that story, the features are detected in its text. A model trained on them learns to use the words
it is given; `slm generate --words`, the API's "words" field and the playground build the same header.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from slm.errors import SlmError

TEMPLATE = "words-v1"  # saved with the data (meta.json) and with every model trained on it (config.json)
N_WORDS = 3  # words per training story by default, as in TinyStories-Instruct (slm prepare --instruct-words)
MAX_WORDS = 8  # words one request may ask for
MAX_WORD_CHARS = 24
STORY_CHARS = 1500  # longer documents are cut into parts of about this size (a header + part fits 512 tokens;
# slm prepare --instruct-part-chars)
WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*")
SPEECH_RE = re.compile(r"[\"“][^\"”\n]{3,}[\"”]")  # quoted speech
FEATURES = {"dialogue": "Dialogue"}  # request name -> header text

# Function words and the commonest verbs: a request for "the, was, said" says nothing about the story.
_STOPWORD_TEXT = """
a about above after again against all also am an and any are as at be because been before being below between
both but by came can come could did do does doing done down during each even ever every few for from further get
got had has have having he her here hers herself him himself his how i if in into is it its itself just let like
made make many may me more most much must my myself never no nor not now of off on once one only or other our ours
ourselves out over own said same say says see she should so some such than that the their theirs them themselves
then there these they this those through to too under until up upon us very was we went were what when where which
while who whom why will with would yes yet you your yours yourself yourselves day time way thing things back
away again oh well mr mrs miss go going gone know knew think thought tell told asked looked look saw want wanted
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


class InstructError(SlmError):
    """A request for words or features that cannot be used."""


@dataclass(frozen=True)
class StoryRequest:
    """What a user asks the story to contain."""

    words: tuple[str, ...] = ()
    features: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.words or self.features)


def check_word(word: str) -> str:
    """A request word, trimmed; one English-looking word, or InstructError naming it."""
    w = word.strip()
    if not w or len(w) > MAX_WORD_CHARS or not WORD_RE.fullmatch(w):
        raise InstructError(f"{word!r} is not a word: give letters only (an apostrophe or hyphen inside is fine), "
                            f"at most {MAX_WORD_CHARS} characters")
    return w


def make_request(words: list[str] | tuple[str, ...] = (), features: list[str] | tuple[str, ...] = ()) -> StoryRequest:
    if len(words) > MAX_WORDS:
        raise InstructError(f"at most {MAX_WORDS} words, got {len(words)}")
    unknown = [f for f in features if f.strip().lower() not in FEATURES]
    if unknown:
        raise InstructError(f"unknown feature(s) {', '.join(map(repr, unknown))}; known: {', '.join(FEATURES)}")
    return StoryRequest(tuple(check_word(w) for w in words), tuple(dict.fromkeys(f.strip().lower() for f in features)))


def header(request: StoryRequest) -> str:
    """The text before a story: its fields, then "Story:" on a line of its own."""
    lines = []
    if request.words:
        lines.append("Words: " + ", ".join(request.words))
    if request.features:
        lines.append("Features: " + ", ".join(FEATURES[f] for f in request.features))
    return "\n".join(lines + ["Story:"]) + "\n"


# ---- training documents ---------------------------------------------------------------------------------
def story_parts(text: str, size: int = STORY_CHARS) -> list[str]:
    """A document cut at paragraph breaks into parts of about ``size`` characters (a short one stays whole)."""
    parts, current = [], ""
    for paragraph in text.strip().split("\n\n"):
        if current and len(current) + len(paragraph) > size:
            parts.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        parts.append(current)
    return parts


def content_words(story: str) -> list[str]:
    """Distinct content words of a story in order of appearance: lower-case words (names and sentence starts
    written only capitalised are left out), not function words, at least three letters."""
    seen = dict.fromkeys(m.group() for m in WORD_RE.finditer(story))
    return [w for w in seen if w.islower() and len(w) >= 3 and w not in STOPWORDS and "'" not in w]


def detect_features(story: str) -> tuple[str, ...]:
    return ("dialogue",) if len(SPEECH_RE.findall(story)) >= 2 else ()


def training_request(story: str, seed: int, n_words: int = N_WORDS) -> StoryRequest:
    """The request this story answers: ``n_words`` of its content words (chosen by a hash of the story and the
    seed, so a corpus prepares the same way every time), in the order the story uses them, and its features."""
    words = content_words(story)
    rng = random.Random(hashlib.blake2b(f"{seed}:{story}".encode(), digest_size=8).digest())
    chosen = sorted(rng.sample(words, min(n_words, len(words))), key=words.index)  # in story order: easier to learn
    return StoryRequest(tuple(chosen), detect_features(story))


class InstructDocument(NamedTuple):
    header: str
    story: str
    ends: bool  # the document ends here; False for a part cut from a longer one, whose end is not a story's end


def instruct_documents(text: str, seed: int, n_words: int = N_WORDS, part_chars: int = STORY_CHARS
                       ) -> list[InstructDocument]:
    """The training documents made from one document of a story corpus: a header and a story each."""
    parts = story_parts(text, part_chars)
    return [InstructDocument(header(training_request(part, seed, n_words)), part, ends=i == len(parts) - 1)
            for i, part in enumerate(parts)]


# ---- measuring: did the story use the words? ------------------------------------------------------------
def stem(word: str) -> str:
    """A crude stem, so that simple inflections match: jump/jumps/jumped/jumping, smile/smiled, run/running,
    and possessives: queen's, girls'."""
    w = word.lower().removesuffix("'s").rstrip("'")
    for suffix in ("ing", "ed", "es", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            break
    w = w.removesuffix("e") if len(w) > 3 else w
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "aeiou":
        w = w[:-1]
    return w


def used_words(story: str, words: tuple[str, ...] | list[str]) -> list[bool]:
    """For each requested word: whether it, or a simple inflection of it, appears in the story."""
    stems = {stem(m.group()) for m in WORD_RE.finditer(story)}
    return [stem(w) in stems for w in words]


# ---- decoding: steering toward the requested words ------------------------------------------------------
WORD_BOOST = 6.0  # the default, chosen by measurement (docs/fine-tuning.md)
WORD_BOOST_RANGE = (0.0, 20.0)
MIN_START_LETTERS = 3  # a capitalised spelling whose first token is shorter (" L" + "oud") is not boosted
USED_TAIL_CHARS = 100  # a word just finished lies in this much of the text's end (MAX_WORD_CHARS and inflections)


class TokenCoder(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


class WordGuide:
    """Steers one sequence's decoding toward the requested words it has not used yet (lexically guided
    decoding: the small models hardly use the header's words on their own, see the bundled model's card).

    Each step, every unused word's first token gets ``boost`` added to its logit, for the word with a space in
    front, lower-case and capitalised; when the text already ends with the start of such a spelling, only its
    next token gets it, so a started word is finished. A word stops being boosted once the text uses it (or an
    inflection: :func:`used_words`).

    The capitalised spelling is left out where the tokenizer splits it after a letter or two (" L" + "oud"):
    boosting " L" pushes every name with that letter, and the model starts names that do not finish as the word
    ("Luli Lanci Lonto"). Left out, the words are used more and invented less (docs/fine-tuning.md)."""

    def __init__(self, tokenizer: TokenCoder, words: Sequence[str], boost: float) -> None:
        self.boost = boost
        self.unused = list(words)
        self.spellings = {w: self._spellings(tokenizer, w) for w in words}

    @staticmethod
    def _spellings(tokenizer: TokenCoder, word: str) -> list[list[int]]:
        lower, capital = tokenizer.encode(" " + word), tokenizer.encode(" " + word.capitalize())
        first_letters = len(tokenizer.decode(capital[:1]).strip())
        whole_or_long = len(capital) == 1 or first_letters >= MIN_START_LETTERS
        return [ids for ids in (lower, capital if whole_or_long and capital != lower else []) if ids]

    def bias(self, generated: Sequence[int]) -> dict[int, float]:
        """Token id -> logit boost for the next token: the next tokens of the words the text has started, or
        when none is started, the first tokens of all unused words."""
        starts, nexts = {}, {}
        for word in self.unused:
            for ids in self.spellings[word]:
                starts[ids[0]] = self.boost
                for k in range(min(len(ids) - 1, len(generated)), 0, -1):  # the longest started prefix
                    if list(generated[-k:]) == ids[:k]:
                        nexts[ids[k]] = self.boost
                        break
        return nexts or starts

    def update(self, text: str) -> None:
        """Forget the words the text (its end, where anything new is) now uses."""
        if self.unused:
            used = used_words(text[-USED_TAIL_CHARS:], self.unused)
            self.unused = [w for w, u in zip(self.unused, used, strict=True) if not u]
