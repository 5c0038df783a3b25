"""Does the tuning data hold the evaluation prompts? A caption matches a prompt *exactly* when their
normalised texts are equal (lower case, Unicode NFKC, punctuation dropped, spaces collapsed), and
*nearly* when at least ``near_overlap`` of the prompt's word n-grams occur in the caption (``ngram``
words; a prompt shorter than that counts as one n-gram, so "a photo of a cat" inside a caption is a
near match). A set that tunes on GenEval's templates would raise GenEval by itself (BLIP3o-60k does).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict

CONTAMINATION_DEFAULTS = dict(ngram=8, near_overlap=0.8, max_exact=0, max_near_fraction=0.01, examples=5)


class ContaminationError(ValueError):
    """A tuning set whose captions hold too many evaluation prompts."""


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class PromptIndex:
    """The evaluation prompts (``{benchmark: [prompt, ...]}``) indexed for exact and near matches."""

    def __init__(self, prompts: dict[str, list[str]], ngram: int, near_overlap: float):
        self.near_overlap = near_overlap
        self.exact: dict[str, tuple[str, str]] = {}
        self.prompts: list[tuple[str, str, int, int]] = []  # benchmark, prompt, n, number of n-grams
        self.by_gram: dict[tuple, list[int]] = defaultdict(list)
        for benchmark, texts in prompts.items():
            for text in texts:
                norm = normalise(text)
                if not norm:
                    continue
                self.exact.setdefault(norm, (benchmark, text))
                words = norm.split()
                n = min(ngram, len(words))
                grams = _grams(words, n)
                index = len(self.prompts)
                self.prompts.append((benchmark, text, n, len(grams)))
                for g in grams:
                    self.by_gram[g].append(index)
        self.sizes = sorted({n for _, _, n, _ in self.prompts})

    def match(self, caption: str) -> tuple[str, str, str] | None:
        """(``exact`` or ``near``, benchmark, prompt) of the caption's strongest match, or None."""
        norm = normalise(caption)
        if norm in self.exact:
            return ("exact", *self.exact[norm])
        words = norm.split()
        hits: dict[int, int] = defaultdict(int)
        for n in self.sizes:
            for g in _grams(words, n):
                for index in self.by_gram.get(g, ()):
                    if self.prompts[index][2] == n:
                        hits[index] += 1
        best = max(hits, key=lambda i: (hits[i] / self.prompts[i][3], -i), default=None)
        if best is not None and hits[best] / self.prompts[best][3] >= self.near_overlap:
            benchmark, text, _, _ = self.prompts[best]
            return ("near", benchmark, text)
        return None


class ContaminationCheck:
    """Counts a stream of captions' matches; ``verdict`` refuses past the configured limits."""

    def __init__(self, prompts: dict[str, list[str]], settings: dict):
        self.settings = {**CONTAMINATION_DEFAULTS, **settings}
        s = self.settings
        self.index = PromptIndex(prompts, int(s["ngram"]), float(s["near_overlap"]))
        self.seen = 0
        self.counts = {"exact": 0, "near": 0}
        self.examples: list[dict] = []

    def add(self, key: str, caption: str) -> None:
        self.seen += 1
        found = self.index.match(caption)
        if found is None:
            return
        kind, benchmark, prompt = found
        self.counts[kind] += 1
        if len(self.examples) < int(self.settings["examples"]):
            self.examples.append(
                {"key": key, "kind": kind, "benchmark": benchmark, "prompt": prompt, "caption": caption}
            )

    def report(self) -> dict:
        return {
            "checked": self.seen,
            "benchmarks": {b: n for b, n in self.benchmark_sizes().items()},
            **self.counts,
            "examples": self.examples,
            "settings": self.settings,
        }

    def benchmark_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = defaultdict(int)
        for benchmark, _, _, _ in self.index.prompts:
            sizes[benchmark] += 1
        return dict(sizes)

    def verdict(self) -> None:
        """Raise ``ContaminationError`` naming examples when the matches pass the limits."""
        s, exact, near = self.settings, self.counts["exact"], self.counts["near"]
        near_fraction = near / max(1, self.seen)
        if exact > int(s["max_exact"]) or near_fraction > float(s["max_near_fraction"]):
            shown = "; ".join(f"{e['key']} ({e['kind']} {e['benchmark']}: {e['prompt']!r})" for e in self.examples)
            raise ContaminationError(
                f"the tuning data holds evaluation prompts: {exact} exact and {near} near-duplicate "
                f"captions of {self.seen} (limits: max_exact {s['max_exact']}, max_near_fraction "
                f"{s['max_near_fraction']}), e.g. {shown}. Tuning on them would inflate the benchmark; "
                "remove them from the set or raise the limits knowingly (tune data contamination)"
            )
