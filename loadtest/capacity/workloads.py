"""What a trace's requests ask for: the prompt and the exact number of tokens to generate.

Each workload has a ``name`` and ``draw(count, rng) -> [(prompt, output_tokens, prompt_tokens)]``.

- ``speed``: the inference log's speed prompts in turn, a fixed output length (the default).
- ``synthetic``: input and output token counts drawn from a distribution (fixed, uniform, or
  normal within bounds); each prompt is a stretch of local text cut to that many tokens of the
  served model's own tokenizer, so "tokens" means that model's tokens.
- ``file``: a local JSONL file, one object a line: ``{"prompt": ..., "output_tokens": N}``, or
  ShareGPT-style ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``
  whose first human turn is the prompt and whose answer's token count is the output length.
- ``prefix``: K shared prefixes of L tokens, each request one of them plus a unique suffix:
  which engines reuse a cached prefix shows in TTFT.

Written ``speed``, ``synthetic:in=uniform(64,256),out=fixed(128)``, ``file:PATH`` or
``prefix:k=4,l=256,suffix=32,out=128`` (parse).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from loadtest import ROOT
from loadtest.measure.prompts import LOG_SPEED_PROMPTS

TEXT_SOURCE = ROOT / "loadtest" / "evaluation" / "tasks" / "source.txt"


@dataclass(frozen=True)
class Lengths:
    """fixed(N), uniform(LOW,HIGH) or normal(MEAN,STD[,LOW,HIGH]): token counts, at least 1."""

    kind: str
    values: tuple[float, ...]

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.values[0])
        if self.kind == "uniform":
            return rng.randint(int(self.values[0]), int(self.values[1]))
        mean, std = self.values[:2]
        low, high = self.values[2:4] if len(self.values) == 4 else (1, mean + 4 * std)
        return int(min(high, max(low, round(rng.gauss(mean, std)))))

    @classmethod
    def parse(cls, text: str) -> Lengths:
        match = re.fullmatch(r"\s*(fixed|uniform|normal)\(([^)]*)\)\s*", text) or re.fullmatch(r"\s*()(\d+)\s*", text)
        if not match:
            raise ValueError(f"a length is fixed(N), uniform(LOW,HIGH) or normal(MEAN,STD[,LOW,HIGH]), got {text!r}")
        kind = match.group(1) or "fixed"
        try:
            values = tuple(float(v) for v in match.group(2).split(","))
        except ValueError:
            raise ValueError(f"{text!r}: the bounds must be numbers") from None
        wanted = {"fixed": (1,), "uniform": (2,), "normal": (2, 4)}[kind]
        if len(values) not in wanted or min(values) < 0 or (kind != "normal" and min(values) < 1):
            raise ValueError(f"{text!r}: {kind} takes {' or '.join(map(str, wanted))} positive numbers")
        if kind == "uniform" and values[0] > values[1]:
            raise ValueError(f"{text!r}: LOW is above HIGH")
        return cls(kind, values)


@dataclass(frozen=True)
class Speed:
    output: Lengths
    name: str = "speed"

    def draw(self, count: int, rng: random.Random):
        return [(LOG_SPEED_PROMPTS[i % len(LOG_SPEED_PROMPTS)], self.output.draw(rng), None) for i in range(count)]


class TextCutter:
    """Local text as the served model's tokens: cuts a stretch of exactly N tokens from a random place."""

    def __init__(self, tokenizer, source: Path = TEXT_SOURCE) -> None:
        self.tokenizer = tokenizer
        self.ids = self.tokenizer(source.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(self.ids) < 16:
            raise ValueError(f"{source}: too little text to cut prompts from")

    def cut(self, tokens: int, rng: random.Random) -> str:
        start = rng.randrange(len(self.ids))
        # Wrap around the text when a prompt is longer than what is left of it.
        ids = [self.ids[(start + i) % len(self.ids)] for i in range(tokens)]
        return self.tokenizer.decode(ids)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@dataclass
class Synthetic:
    input: Lengths
    output: Lengths
    cutter: TextCutter
    name: str = "synthetic"

    def draw(self, count: int, rng: random.Random):
        drawn = []
        for _ in range(count):
            tokens = self.input.draw(rng)
            drawn.append((self.cutter.cut(tokens, rng), self.output.draw(rng), tokens))
        return drawn


@dataclass
class Prefix:
    prefixes: int
    prefix_tokens: int
    suffix_tokens: int
    output: Lengths
    cutter: TextCutter
    name: str = "prefix"

    def draw(self, count: int, rng: random.Random):
        shared = [self.cutter.cut(self.prefix_tokens, rng) for _ in range(self.prefixes)]
        return [
            (
                shared[i % self.prefixes] + self.cutter.cut(self.suffix_tokens, rng),
                self.output.draw(rng),
                self.prefix_tokens + self.suffix_tokens,
            )
            for i in range(count)
        ]


@dataclass
class FileWorkload:
    """The file's entries in a seeded random order (with repeats when the trace is longer)."""

    entries: list[tuple[str, int]]
    name: str

    def draw(self, count: int, rng: random.Random):
        order = list(range(len(self.entries)))
        picked: list[int] = []
        while len(picked) < count:
            rng.shuffle(order)
            picked += order
        return [(*self.entries[i], None) for i in picked[:count]]


def read_file(path: Path, count_tokens, default_output: int) -> list[tuple[str, int]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with 'prompt' or 'conversations'")
        if "conversations" in item:
            turns = item["conversations"]
            asked = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
            answer = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
            if not asked:
                raise ValueError(f"{where}: a conversation without a human turn")
            output = item.get("output_tokens") or (count_tokens(answer) if answer else default_output)
            entries.append((asked, max(1, int(output))))
        elif isinstance(item.get("prompt"), str):
            entries.append((item["prompt"], max(1, int(item.get("output_tokens", default_output)))))
        else:
            raise ValueError(f"{where}: expected an object with 'prompt' or 'conversations'")
    if not entries:
        raise ValueError(f"{path}: no prompts")
    return entries


def _fields(text: str) -> dict[str, str]:
    # Splits on the commas between key=value pairs, not those inside a length's parentheses.
    return dict(part.split("=", 1) for part in re.split(r",(?![^()]*\))", text) if "=" in part)


def parse(spec: str, model_path: str | None, output_tokens: int = 128):
    """A workload from its written form (the module's docstring); ``output_tokens``: the default output length."""
    kind, _, rest = spec.partition(":")
    output = Lengths("fixed", (output_tokens,))
    if kind == "speed":
        fields = _fields(rest)
        return Speed(Lengths.parse(fields["out"]) if "out" in fields else output)
    if kind in ("synthetic", "prefix", "file") and model_path is None:
        raise ValueError(f"the {kind} workload needs the model's tokenizer")
    if kind == "synthetic":
        fields = _fields(rest)
        return Synthetic(
            Lengths.parse(fields.get("in", "fixed(128)")),
            Lengths.parse(fields["out"]) if "out" in fields else output,
            TextCutter(load_tokenizer(model_path)),
        )
    if kind == "prefix":
        fields = _fields(rest)
        try:
            k, length, suffix = int(fields.get("k", 4)), int(fields.get("l", 256)), int(fields.get("suffix", 32))
        except ValueError:
            raise ValueError(f"{spec!r}: k, l and suffix are whole numbers") from None
        if min(k, length, suffix) < 1:
            raise ValueError(f"{spec!r}: k, l and suffix must be at least 1")
        out = Lengths.parse(fields["out"]) if "out" in fields else output
        return Prefix(k, length, suffix, out, TextCutter(load_tokenizer(model_path)))
    if kind == "file":
        path = Path(rest)
        if not path.is_file():
            raise ValueError(f"workload file {rest!r} not found")
        tokenizer = load_tokenizer(model_path)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        return FileWorkload(read_file(path, count, output_tokens), f"file:{path.name}")
    raise ValueError(f"a workload is speed, synthetic:..., file:PATH or prefix:..., got {spec!r}")
