"""Builds the local lm-eval task set's data files from ``source.txt``: ``python -m loadtest.evaluation.tasks.build``.

The JSONL files under ``data/`` are committed; this is how they were made, and re-running it
must reproduce them byte for byte (a test checks), so every choice below is seeded.

- ``yayi_docs_mc`` (multiple choice, loglikelihood): a sentence's first half, and four endings:
  its own and three other sentences' second halves.  Accuracy is how often the model's most
  likely ending is the true one.
- ``yayi_docs_ppl`` (loglikelihood_rolling): the sentences in pairs, scored whole, for word and
  byte perplexity and bits per byte.
- ``yayi_docs_copy`` (generate_until): copy a sentence after one worked example; exact match.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "source.txt"
DATA = HERE / "data"
SEED = 20
CHOICES = 4
# The copy task's worked example is the first sentence, so it is never also a question.
COPY_EXAMPLE_INDEX = 0
COPY_DOCS = 16
MIN_MC_WORDS = 8


def sentences(source: Path = SOURCE) -> list[str]:
    lines = (line.strip() for line in source.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def halves(sentence: str) -> tuple[str, str]:
    words = sentence.split()
    middle = len(words) // 2
    return " ".join(words[:middle]), " ".join(words[middle:])


def multiple_choice(texts: list[str]) -> list[dict]:
    split = [halves(t) for t in texts if len(t.split()) >= MIN_MC_WORDS]
    docs = []
    for i, (context, ending) in enumerate(split):
        rng = random.Random(SEED * 1000 + i)
        others = [e for j, (_, e) in enumerate(split) if j != i and e != ending]
        choices = [ending, *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        docs.append({"id": i, "context": context, "choices": choices, "label": choices.index(ending)})
    return docs


def rolling(texts: list[str]) -> list[dict]:
    return [{"id": i // 2, "text": " ".join(texts[i : i + 2])} for i in range(0, len(texts), 2)]


def copying(texts: list[str]) -> list[dict]:
    candidates = [t for i, t in enumerate(texts) if i != COPY_EXAMPLE_INDEX]
    # The shortest sentences: the task measures agreement, and generation is the slow part on a CPU.
    chosen = sorted(sorted(candidates, key=lambda t: (len(t), t))[:COPY_DOCS], key=candidates.index)
    return [{"id": i, "sentence": t} for i, t in enumerate(chosen)]


def build(out: Path = DATA, source: Path = SOURCE) -> dict[str, Path]:
    texts = sentences(source)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, docs in (
        ("yayi_docs_mc", multiple_choice(texts)),
        ("yayi_docs_ppl", rolling(texts)),
        ("yayi_docs_copy", copying(texts)),
    ):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
        written[name] = path
    return written


def copy_example(source: Path = SOURCE) -> str:
    return sentences(source)[COPY_EXAMPLE_INDEX]


if __name__ == "__main__":
    for name, path in build().items():
        print(f"{name}: {sum(1 for _ in path.open())} docs in {path.relative_to(HERE.parents[2])}")
    print(f"copy task's worked example: {copy_example()!r}")
