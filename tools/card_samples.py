"""The samples of a model card, in Markdown, from the commands the card shows.

    python tools/card_samples.py [--model default] [--bundled-json benchmarks/bundled-model.json] > samples.md

Each sample is one `slm generate --json` run at the playground's defaults (its example prompts, seeds 1-5),
then one request for words; the greedy answer is the last model's first greedy story in `bundled_model.py`'s
JSON, so that it is the one that benchmark counted sentences in.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bundled_model.py, beside this file
from bundled_model import PLAYGROUND  # noqa: E402  (the playground's prompts and defaults)

SAMPLE_TOKENS = 80
WORDS_REQUEST = ["--words", "bottle,queen,loud", "--features", "dialogue", "--prompt", "Once",
                 "--max-new-tokens", "120", "--seed", "1"]


def defaults() -> list[str]:
    return ["--temperature", f"{PLAYGROUND.TEMPERATURE_DEFAULT:g}",
            "--repetition-penalty", f"{PLAYGROUND.REPETITION_DEFAULT:g}"]


def generate(model: str, flags: list[str]) -> tuple[str, dict]:
    """The command as the card prints it, and what `--json` returned for it."""
    command = ["slm", "generate", "--model", model, *flags]
    result = subprocess.run([sys.executable, "-m", "slm.cli", *command[1:], "--json"], check=True,
                            capture_output=True, text=True)
    return shlex.join(command), json.loads(result.stdout)


def quote(text: str) -> str:
    return "\n".join(f"> {line}".rstrip() for line in text.strip("\n").split("\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--bundled-json", type=Path, help="bundled_model.py's --json output, for the greedy sample")
    args = parser.parse_args()
    print(f"At the playground's defaults, {SAMPLE_TOKENS} new tokens, `slm generate --model {args.model} "
          f"--prompt PROMPT {' '.join(defaults())} --max-new-tokens {SAMPLE_TOKENS} --seed S`:\n")
    for seed, prompt in enumerate(PLAYGROUND.EXAMPLE_PROMPTS, start=1):
        _, out = generate(args.model, ["--prompt", prompt, *defaults(), "--max-new-tokens", str(SAMPLE_TOKENS),
                                       "--seed", str(seed)])
        print(f"**{prompt!r}** (seed {seed})\n{quote(out['prompt'] + out['text'])}\n")
    if args.bundled_json:
        greedy = json.loads(args.bundled_json.read_text())["rows"][-1]["greedy"][0]
        print(f"Greedy with repetition penalty {PLAYGROUND.REPETITION_DEFAULT:g} "
              f"({PLAYGROUND.MAX_NEW_DEFAULT} tokens, from `bundled_model.py`):\n")
        print(quote(greedy["prompt"] + greedy["text"]) + "\n")
    command, out = generate(args.model, [*WORDS_REQUEST, *defaults()])
    used = ", ".join(f"{w} {'yes' if ok else 'no'}" for w, ok in zip(out["words"], out["words_used"], strict=True))
    print(f"With requested words, `{command}` (`words_used`: {used}):\n\n{quote(out['prompt'] + out['text'])}")


if __name__ == "__main__":
    main()
