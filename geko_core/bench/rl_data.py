"""Prompts and verifiable rewards of the ``rl-algo`` task (RL fine-tuning with GRPO).

Every prompt is a short string of a small character vocabulary (``VOCAB``), left-padded with
``PAD`` to a fixed width ``PROMPT_LEN``, so the completion always starts at the same position
in training, sampling and evaluation alike (the padding is an ordinary token the model sees;
no attention mask is needed). A completion ends with ``END`` (``"\\n"``); the answer is the
text before it.

Families (``FAMILIES``), generated from a seed, each prompt unique across the splits:

* ``max``: ``max 3917=`` → ``9`` (largest digit of 4–6 digits);
* ``cnt``: ``#a abcaab=`` → ``3`` (occurrences of a letter in a word over ``abcd``);
* ``rev``: ``rev abcd=`` → ``dcba`` (3–5 letters of ``a``–``h``);
* ``add``: ``47+8=`` → ``55`` (a number below 100 plus a digit);
* ``mul``: ``47*8=`` → ``376`` (a number from 2 to 99 times a digit from 2);
* ``srt`` (graded): ``srt 3141=`` → ``1134``, reward the share of positions right
  (``graded_reward``); every other family is exact-answer 0/1.

A completion without ``END`` within the token limit scores 0 in every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "END",
    "FAMILIES",
    "GRADED",
    "PAD",
    "PROMPT_LEN",
    "RLData",
    "RLSplit",
    "VOCAB",
    "decode",
    "encode",
    "graded_reward",
    "make_rl_data",
    "score",
]

#: token 0 pads prompts (and completions after their end), token 1 ends a completion
VOCAB = ("<pad>", "\n") + tuple("0123456789abcdefghijklmnopqrstuvwxyz +*=#")
PAD, END = 0, 1
_INDEX = {ch: i for i, ch in enumerate(VOCAB) if i > END}
#: prompt width in tokens (the longest prompt, ``#a abcdabcd=``, is 12)
PROMPT_LEN = 12
#: answer tokens at most, the end token included (6 characters + END)
MAX_ANSWER = 7


def encode(text: str) -> list[int]:
    """Token ids of ``text``.

    Raises:
        ValueError: a character outside ``VOCAB``.
    """
    try:
        return [_INDEX[ch] for ch in text]
    except KeyError as err:
        raise ValueError(f"character {err.args[0]!r} of {text!r} is not in the rl-algo vocabulary") from None


def decode(tokens: Sequence[int]) -> str:
    """The text of ``tokens`` before the first ``END`` (``PAD`` skipped), for reading."""
    out = []
    for t in tokens:
        t = int(t)
        if t == END:
            break
        if t != PAD:
            out.append(VOCAB[t])
    return "".join(out)


def _answer_of(tokens: Sequence[int]) -> str | None:
    """The text before the first ``END``, or None when the completion has no end token."""
    toks = [int(t) for t in tokens]
    if END not in toks:
        return None
    return "".join(VOCAB[t] if t > END else "?" for t in toks[: toks.index(END)])


# --------------------------------------------------------------------------------------------
# Families


def _digits(rng: np.random.Generator, low: int, high: int) -> str:
    return "".join(str(int(d)) for d in rng.integers(0, 10, size=int(rng.integers(low, high + 1))))


def _fam_max(rng: np.random.Generator) -> tuple[str, str]:
    d = _digits(rng, 4, 6)
    return f"max {d}=", max(d)


def _fam_cnt(rng: np.random.Generator) -> tuple[str, str]:
    letter = "abcd"[int(rng.integers(0, 4))]
    word = "".join("abcd"[int(i)] for i in rng.integers(0, 4, size=int(rng.integers(4, 9))))
    return f"#{letter} {word}=", str(word.count(letter))


def _fam_rev(rng: np.random.Generator) -> tuple[str, str]:
    word = "".join(chr(97 + int(i)) for i in rng.integers(0, 8, size=int(rng.integers(3, 6))))
    return f"rev {word}=", word[::-1]


def _fam_add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = int(rng.integers(0, 100)), int(rng.integers(0, 10))
    return f"{a}+{b}=", str(a + b)


def _fam_mul(rng: np.random.Generator) -> tuple[str, str]:
    a, b = int(rng.integers(2, 100)), int(rng.integers(2, 10))
    return f"{a}*{b}=", str(a * b)


def _fam_srt(rng: np.random.Generator) -> tuple[str, str]:
    d = _digits(rng, 4, 6)
    return f"srt {d}=", "".join(sorted(d))


#: name -> generator of one (prompt, answer)
FAMILIES: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "max": _fam_max,
    "cnt": _fam_cnt,
    "rev": _fam_rev,
    "add": _fam_add,
    "mul": _fam_mul,
    "srt": _fam_srt,
}
#: families scored with partial credit (``graded_reward``)
GRADED = frozenset({"srt"})


def graded_reward(answer: str, completion: str) -> float:
    """Share of positions where ``completion`` has ``answer``'s character, over the longer of
    the two (a completion too long or too short loses the positions it misses or adds)."""
    longest = max(len(answer), len(completion))
    if longest == 0:
        return 1.0
    return sum(a == c for a, c in zip(answer, completion)) / longest


def score(family: str, answer: str, completion: Sequence[int]) -> float:
    """The verifiable reward of one completion (token ids, ``END`` included) in ``[0, 1]``.

    Raises:
        ValueError: an unknown family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    text = _answer_of(completion)
    if text is None:
        return 0.0
    if family in GRADED:
        return graded_reward(answer, text)
    return 1.0 if text == answer else 0.0


# --------------------------------------------------------------------------------------------
# Splits


@dataclass
class RLSplit:
    """One split of prompts.

    Attributes:
        prompts: int64 ``[N, PROMPT_LEN]``, left-padded with ``PAD``.
        answers: the reference answers (without ``END``).
        family: int64 ``[N]``, index into ``FAMILIES``.
        text: the prompts as strings.
    """

    prompts: np.ndarray
    answers: list[str]
    family: np.ndarray
    text: list[str]

    def __len__(self) -> int:
        return int(self.prompts.shape[0])

    def reward(self, prompt_id: int, completion: Sequence[int]) -> float:
        """``score`` of one completion of prompt ``prompt_id``.

        Raises:
            IndexError: ``prompt_id`` out of range.
        """
        if not 0 <= int(prompt_id) < len(self):
            raise IndexError(f"prompt_id {prompt_id} out of range for a split of {len(self)} prompts")
        return score(_NAMES[int(self.family[prompt_id])], self.answers[prompt_id], completion)

    def rewards(self, indices: np.ndarray, completions: np.ndarray) -> np.ndarray:
        """float32 ``[B, G]``: the rewards of ``completions`` ``[B*G, T]`` (prompt-major rows,
        ``G`` per prompt) of prompts ``indices`` ``[B]``."""
        indices = np.asarray(indices, dtype=np.int64)
        b = len(indices)
        if b == 0 or completions.shape[0] % b:
            raise ValueError(f"{completions.shape[0]} completions are not a whole number of groups for {b} prompts")
        g = completions.shape[0] // b
        out = np.empty((b, g), dtype=np.float32)
        for row in range(b):
            for j in range(g):
                out[row, j] = self.reward(int(indices[row]), completions[row * g + j])
        return out


_NAMES = tuple(FAMILIES)


@dataclass
class RLData:
    train: RLSplit
    validation: RLSplit
    test: RLSplit
    #: prompts of the supervised warm start only (disjoint from the other three)
    warmup: RLSplit
    families: tuple[str, ...]


def _encode_split(items: list[tuple[str, str, int]]) -> RLSplit:
    prompts = np.full((len(items), PROMPT_LEN), PAD, dtype=np.int64)
    for i, (prompt, answer, _) in enumerate(items):
        ids = encode(prompt)
        if len(ids) > PROMPT_LEN or len(answer) + 1 > MAX_ANSWER:
            raise ValueError(f"{(prompt, answer)!r} exceeds the prompt width {PROMPT_LEN} or the answer limit {MAX_ANSWER}")
        encode(answer)
        prompts[i, PROMPT_LEN - len(ids) :] = ids
    return RLSplit(prompts, [a for _, a, _ in items], np.array([f for _, _, f in items], dtype=np.int64), [p for p, _, _ in items])


def make_rl_data(num_train: int, num_validation: int, num_test: int, *, num_warmup: int = 0, seed: int = 0) -> RLData:
    """Balanced families, every prompt unique across the four splits.

    Each family draws a pool of distinct prompts from one generator seeded with ``seed``; the
    test split takes the first share, then validation, then training, then the warm-up
    prompts (the supervised warm start's, ``num_warmup``, none by default), so no test prompt
    is in any other split. Splits are shuffled deterministically in ``seed``.

    Raises:
        ValueError: a split smaller than the number of families, or a family with too few
            distinct prompts.
    """
    k = len(FAMILIES)
    if num_warmup and num_warmup < k:
        raise ValueError(f"num_warmup must be 0 or at least the number of families ({k}), got {num_warmup}")
    for value, label in ((num_train, "num_train"), (num_validation, "num_validation"), (num_test, "num_test")):
        if value < k:
            raise ValueError(f"{label} must be at least the number of families ({k}), got {value}")
    rng = np.random.default_rng(seed)
    splits: dict[str, list[tuple[str, str, int]]] = {"test": [], "validation": [], "train": [], "warmup": []}
    sizes = {"test": num_test, "validation": num_validation, "train": num_train, "warmup": num_warmup}
    for fam, make in enumerate(FAMILIES.values()):
        wanted = {s: n // k + (1 if fam < n % k else 0) for s, n in sizes.items()}
        total = sum(wanted.values())
        seen: set[str] = set()
        pool: list[tuple[str, str, int]] = []
        for _ in range(50 * total):
            prompt, answer = make(rng)
            if prompt not in seen:
                seen.add(prompt)
                pool.append((prompt, answer, fam))
                if len(pool) == total:
                    break
        else:
            raise ValueError(f"family {_NAMES[fam]!r} has fewer than {total} distinct prompts")
        start = 0
        for split in ("test", "validation", "train", "warmup"):
            splits[split] += pool[start : start + wanted[split]]
            start += wanted[split]
    order = np.random.default_rng([seed, 1])
    shuffled = {s: [items[i] for i in order.permutation(len(items))] for s, items in splits.items()}
    return RLData(
        train=_encode_split(shuffled["train"]),
        validation=_encode_split(shuffled["validation"]),
        test=_encode_split(shuffled["test"]),
        warmup=_encode_split(shuffled["warmup"]),
        families=_NAMES,
    )
