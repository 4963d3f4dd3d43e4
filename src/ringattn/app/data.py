"""Deterministic long-context data, generated on the fly: byte-level tokens (vocabulary 256).

Sample ``i`` of a task depends only on ``(seed, i, seq_len)``, so the "data position" of a run is a
single integer (samples consumed) and resuming from a checkpoint replays exactly the same stream.

Tasks:
- ``passkey``: a 5-digit number hidden at a random depth in repetitive filler text, asked for at the
  end ("What is the pass key? The pass key is 12345"). Accuracy: the whole key right.
- ``passkey-random``: the same needle and question in a haystack of random letters, loss on the key
  only (``RandomPasskey``): what a model must retrieve to lower its loss.
- ``passkey-place``: ``passkey-random`` with a marker byte before the key and each digit a token of its
  own place (``PlacePasskey``): retrievable by content alone at any length.
- ``mqar``: multi-query associative recall (Zoology): key/value pairs, then queries of the keys, each
  followed by its value. Accuracy: per query.
- ``text``: random windows of a byte-level text file (real data; no accuracy).

Every sample is ``seq_len + 1`` tokens; inputs are the first ``seq_len`` and labels the last
``seq_len`` (the next-token shift is done here, on the global sequence, before any sharding).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch

from ..training.batch import IGNORE_INDEX

FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. "
          b"There and back again. ")
QUESTION = b" What is the pass key? The pass key is "
KEY_DIGITS = 5
RANDOM_FILLER = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz   "))  # spaces ~1 in 10: word-like runs
PLACE_TOKENS = 128  # passkey-place: the key's digit d at place k is token PLACE_TOKENS + 10 k + d
# mqar vocabulary: keys and values from disjoint byte ranges
MQAR_KEYS = (128, 192)
MQAR_VALUES = (192, 256)


def _generator(seed: int, index: int) -> torch.Generator:
    # Mix (seed, index) into one 63-bit seed: neighbouring samples get unrelated streams.
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % 2**63)


@dataclass
class Batch:
    """Full (unsharded) sequences: ``inputs``/``labels`` ``(b, s)``, ``answer`` marks label positions
    that are task answers (for accuracy)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    answer: torch.Tensor


class TrainTask:
    name = "task"
    per_token = True  # accuracy per answer token (mqar) or per sample, all answer tokens right (passkey)
    min_len = 1

    def __init__(self, seed: int = 0):
        self.seed = seed

    def sequence(self, index: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``seq_len + 1`` tokens, a (seq_len,) bool mask of supervised labels, and of answer labels."""
        raise NotImplementedError

    def batch(self, start: int, n: int, seq_len: int) -> Batch:
        """Samples ``start, ..., start + n - 1`` at length ``seq_len``."""
        if seq_len < self.min_len:
            raise ValueError(f"seq_len must be >= {self.min_len} for task {self.name!r}, got {seq_len}")
        return self._stack([self.sequence(start + i, seq_len) for i in range(n)])

    @staticmethod
    def _stack(samples: list) -> Batch:
        seqs, sup, ans = zip(*samples)
        seq = torch.stack(seqs)
        labels = seq[:, 1:].clone()
        labels[~torch.stack(sup)] = IGNORE_INDEX
        return Batch(seq[:, :-1].contiguous(), labels, torch.stack(ans))


class Passkey(TrainTask):
    name = "passkey"
    per_token = False
    min_len = 96

    needle_text = (b" The pass key is ", b". Remember it. ")  # around the key
    question = QUESTION  # followed by the key

    def key_tokens(self, digits: list[int]) -> bytes:
        """The key's tokens: its digits as ASCII."""
        return "".join(map(str, digits)).encode()

    def filler(self, g: torch.Generator, n: int) -> bytes:
        """``n`` bytes of haystack."""
        return (FILLER * (n // len(FILLER) + 1))[:n]

    def supervised(self, answer: torch.Tensor) -> torch.Tensor:
        """Which labels the loss sees: every one (the filler is predictable text)."""
        return torch.ones_like(answer)

    def sequence(self, index, seq_len, depth: float | None = None):
        """``depth`` in [0, 1] puts the needle at that fraction of the haystack (evaluation by depth);
        None draws it uniformly."""
        g = _generator(self.seed, index)
        key = self.key_tokens(torch.randint(0, 10, (KEY_DIGITS,), generator=g).tolist())
        needle = self.needle_text[0] + key + self.needle_text[1]
        tail = self.question + key
        n_fill = seq_len + 1 - len(needle) - len(tail)
        if n_fill < 0:
            raise ValueError(f"seq_len must be >= {self.min_len} for task {self.name!r}, got {seq_len}")
        at = int(torch.randint(0, n_fill + 1, (1,), generator=g))
        if depth is not None:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth must be in [0, 1], got {depth}")
            at = round(depth * n_fill)
        filler = self.filler(g, n_fill)
        text = filler[:at] + needle + filler[at:] + tail
        seq = torch.tensor(list(text), dtype=torch.int64)
        answer = torch.zeros(seq_len, dtype=torch.bool)
        answer[-KEY_DIGITS:] = True  # labels of the last KEY_DIGITS inputs are the key's digits
        return seq, self.supervised(answer), answer

    def at_depth(self, start: int, n: int, seq_len: int, depth: float) -> Batch:
        """Samples ``start, ..., start + n - 1`` with the needle at ``depth`` (fraction of the haystack)."""
        return self._stack([self.sequence(start + i, seq_len, depth) for i in range(n)])


class RandomPasskey(Passkey):
    """Passkey in a haystack of random lowercase letters and spaces, with the loss on the answer only.

    The repeated-sentence haystack lets the loss fall to ~0 without any retrieval (the filler is all
    but a few tokens of every sequence, and perfectly predictable); here the filler is noise that no
    model can predict, it holds no digit and no ``key is`` (a 26-letter alphabet makes a random match
    of the question's wording negligible), and only the key's digits after the question are scored.
    """

    name = "passkey-random"

    def filler(self, g, n):
        return bytes(RANDOM_FILLER[torch.randint(0, len(RANDOM_FILLER), (n,), generator=g)].tolist())

    def supervised(self, answer):
        return answer.clone()


class PlacePasskey(RandomPasskey):
    """``passkey-random`` with a marker before the key and each digit a token of its own place.

    Needle ``" pass key=" KEY ". "``, question ``" What is the pass key? pass key=" KEY``; digit ``d`` at
    place ``k`` (0-4) of the key is token ``PLACE_TOKENS + 10 k + d`` (bytes 128-177, unused by text).
    Neither ``=`` nor any key token occurs in the haystack or elsewhere, so every answer token is found by
    what it is alone: the ``k``-th digit is the one key token of place ``k`` before the question, at any
    distance and among any number of haystack tokens. With ASCII digits a digit is found only by the
    ones before it (an induction match), and repeated digits make that ambiguous: a match on the
    previous two tokens still leaves 5.5 % of keys with two continuations (docs/benchmarks.md, passkey).
    """

    name = "passkey-place"
    needle_text = (b" pass key=", b". ")
    question = b" What is the pass key? pass key="

    def key_tokens(self, digits):
        return bytes(PLACE_TOKENS + 10 * k + d for k, d in enumerate(digits))


class MQAR(TrainTask):
    name = "mqar"
    per_token = True
    min_len = 8

    def __init__(self, seed: int = 0, max_pairs: int = 64):
        super().__init__(seed)
        self.max_pairs = max_pairs

    def sequence(self, index, seq_len):
        g = _generator(self.seed, index)
        n_tok = seq_len + 1
        n_pairs = max(1, min(self.max_pairs, n_tok // 4, MQAR_KEYS[1] - MQAR_KEYS[0]))
        n_queries = (n_tok - 2 * n_pairs) // 2
        lead = n_tok - 2 * n_pairs - 2 * n_queries  # 0 or 1 padding token in front
        keys = MQAR_KEYS[0] + torch.randperm(MQAR_KEYS[1] - MQAR_KEYS[0], generator=g)[:n_pairs]
        values = torch.randint(*MQAR_VALUES, (n_pairs,), generator=g)
        pick = torch.randint(0, n_pairs, (n_queries,), generator=g)
        seq = torch.cat([torch.zeros(lead, dtype=torch.int64),
                         torch.stack([keys, values], 1).flatten(),
                         torch.stack([keys[pick], values[pick]], 1).flatten()])
        # label j is token j + 1: the values of the queries sit at odd offsets of the query section
        answer = torch.zeros(seq_len, dtype=torch.bool)
        q0 = lead + 2 * n_pairs
        answer[q0: q0 + 2 * n_queries: 2] = True
        return seq, answer.clone(), answer


class TextFile(TrainTask):
    name = "text"
    per_token = True

    def __init__(self, path: str | pathlib.Path, seed: int = 0):
        super().__init__(seed)
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"text file not found: {p}")
        self.data = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)

    def sequence(self, index, seq_len):
        if len(self.data) < seq_len + 1:
            raise ValueError(f"text file has {len(self.data)} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        g = _generator(self.seed, index)
        off = int(torch.randint(0, len(self.data) - seq_len, (1,), generator=g))
        seq = self.data[off: off + seq_len + 1].to(torch.int64)
        return seq, torch.ones(seq_len, dtype=torch.bool), torch.zeros(seq_len, dtype=torch.bool)


TASKS = ("passkey", "passkey-random", "passkey-place", "mqar", "text")
PASSKEY_TASKS = ("passkey", "passkey-random", "passkey-place")


def make_task(name: str, *, seed: int = 0, text_file: str | None = None) -> TrainTask:
    """A task by name: ``passkey``, ``passkey-random``, ``passkey-place``, ``mqar`` or ``text`` (needs
    ``text_file``)."""
    if name == "passkey":
        return Passkey(seed)
    if name == "passkey-random":
        return RandomPasskey(seed)
    if name == "passkey-place":
        return PlacePasskey(seed)
    if name == "mqar":
        return MQAR(seed)
    if name == "text":
        if not text_file:
            raise ValueError("task 'text' needs a text file (--text-file PATH)")
        return TextFile(text_file, seed)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")
