"""The data of the fine-tuning tasks (``sft.py``): instruction pairs, byte-encoded and split.

Every sample is a byte sequence ``prompt + response`` padded with ``PAD`` to a fixed length
``T``. ``labels`` hold the response bytes at their own positions and -100 on the prompt and
the padding, aligned with ``inputs``: the loss applies the causal shift, so only the response
is trained. Each sample belongs to a family (``family`` ids index ``families``), and every
task has disjoint train, validation and test splits, the validation split carved out of the
training data.

* ``sft-algo`` (``make_algo_sft``): string and number instructions generated from a seed.
* ``sft-stdlib`` (``make_stdlib_sft``): instructions about the functions of the standard
  library's source (headers parsed with ``ast``), split by file.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .data import _HELD_OUT_BUCKETS, _stdlib_file_bucket, _stdlib_files

__all__ = [
    "ALGO_FAMILIES",
    "IGNORE_INDEX",
    "PAD",
    "STDLIB_FAMILIES",
    "SFTData",
    "SFTSplit",
    "encode_pairs",
    "make_algo_sft",
    "make_stdlib_sft",
]

PAD = 0
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Encoding and splits


@dataclass
class SFTSplit:
    """One split of a fine-tuning task.

    Attributes:
        inputs: int64 ``[N, T]``: prompt bytes, response bytes, then ``PAD``.
        labels: int64 ``[N, T]``: the response bytes at their positions, -100 elsewhere
            (aligned with ``inputs``; the loss shifts).
        family: int64 ``[N]``: index into ``SFTData.families``.
        prompt_len: int64 ``[N]``: prompt bytes (the response starts there).
        text: ``(prompt, response)`` pairs, for reading samples.
    """

    inputs: np.ndarray
    labels: np.ndarray
    family: np.ndarray
    prompt_len: np.ndarray
    text: list[tuple[str, str]]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def response_tokens(self) -> np.ndarray:
        """int64 ``[N]``: response tokens per sample (the tokens a fine-tuning step trains)."""
        return (self.labels != IGNORE_INDEX).sum(axis=1).astype(np.int64)


@dataclass
class SFTData:
    train: SFTSplit
    validation: SFTSplit
    test: SFTSplit
    families: tuple[str, ...]
    seq_len: int


def encode_pairs(pairs: list[tuple[str, str, int]], seq_len: int) -> SFTSplit:
    """Byte-encode ``(prompt, response, family)`` triples into a padded split.

    Raises:
        ValueError: a pair is longer than ``seq_len`` bytes, is not ASCII, or has an empty
            prompt or response.
    """
    n = len(pairs)
    inputs = np.full((n, seq_len), PAD, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    family = np.zeros(n, dtype=np.int64)
    prompt_len = np.zeros(n, dtype=np.int64)
    for i, (prompt, response, fam) in enumerate(pairs):
        p, r = prompt.encode("ascii"), response.encode("ascii")
        if not p or not r:
            raise ValueError(f"empty prompt or response in {(prompt, response)!r}")
        if len(p) + len(r) > seq_len:
            raise ValueError(f"{(prompt, response)!r} is {len(p) + len(r)} bytes, longer than seq_len={seq_len}")
        whole = np.frombuffer(p + r, dtype=np.uint8)
        inputs[i, : len(whole)] = whole
        labels[i, len(p) : len(whole)] = whole[len(p) :]
        family[i] = fam
        prompt_len[i] = len(p)
    return SFTSplit(inputs, labels, family, prompt_len, [(p, r) for p, r, _ in pairs])


def _per_family(total: int, families: int) -> list[int]:
    base, extra = divmod(total, families)
    return [base + (1 if f < extra else 0) for f in range(families)]


def _shuffled(pairs: list[tuple[str, str, int]], rng: np.random.Generator) -> list[tuple[str, str, int]]:
    return [pairs[i] for i in rng.permutation(len(pairs))]


# --------------------------------------------------------------------------------------------
# sft-algo: string and number instructions

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: np.random.Generator, low: int, high: int) -> str:
    length = int(rng.integers(low, high + 1))
    return "".join(_LETTERS[i] for i in rng.integers(0, 26, size=length))


def _fam_len(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 1, 9)
    return f"len {w}=", f"{len(w)}\n"


def _fam_first(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 5, 5)
    return f"first {w}=", f"{w[0]}\n"


def _fam_rev(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 5, 5)
    return f"rev {w}=", f"{w[::-1]}\n"


def _fam_max(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 6, 6)
    return f"max {w}=", f"{max(w)}\n"


def _fam_sort(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 5, 5)
    return f"sort {w}=", "".join(sorted(w)) + "\n"


def _fam_copy(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 3, 6)
    return f"copy {w}=", f"{w}\n"


def _fam_add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    return f"add {a:02d}+{b:02d}=", f"{a + b:03d}\n"


def _fam_hash(rng: np.random.Generator) -> tuple[str, str]:
    w = _word(rng, 5, 5)
    return f"hash {w}=", hashlib.blake2b(w.encode(), digest_size=2).hexdigest()[:3] + "\n"


#: name -> generator of one (prompt, response), from learned first to never learned. Measured
#: with full training at the default scale, seeds 0-2 (``python benchmarks/sft_curves.py
#: sft-algo --scale default --seeds 0,1,2``), test exact match: ``len`` and ``first`` 67-88%
#: after the first epoch and 99-100% after the second; ``rev`` and ``max`` about 85% after the
#: second and 93-100% by the fourth; ``sort`` and ``copy`` late, 40-65% after the sixth;
#: ``add`` 1-4% and ``hash`` 0% throughout. Fixed word lengths keep the positions of
#: ``first``/``rev``/``max``/``sort`` fixed; ``copy`` varies its length, which is what makes
#: it late; ``add`` is learnable in principle but not within the budget; ``hash`` never (the
#: response is a hash of the word, so a held-out word cannot be answered).
ALGO_FAMILIES: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "len": _fam_len,
    "first": _fam_first,
    "rev": _fam_rev,
    "max": _fam_max,
    "sort": _fam_sort,
    "copy": _fam_copy,
    "add": _fam_add,
    "hash": _fam_hash,
}


def make_algo_sft(num_train: int, num_validation: int, num_test: int, *, seq_len: int = 20, seed: int = 0) -> SFTData:
    """The ``sft-algo`` data: balanced families, every prompt unique across the splits.

    Each family draws a pool of distinct prompts from one generator seeded with ``seed``; the
    test split comes first, then the training data, of which the validation split is the
    first share. Splits are shuffled (families interleaved) deterministically in ``seed``.
    """
    for value, label in ((num_train, "num_train"), (num_validation, "num_validation"), (num_test, "num_test")):
        if value < len(ALGO_FAMILIES):
            raise ValueError(f"{label} must be at least the number of families ({len(ALGO_FAMILIES)}), got {value}")
    rng = np.random.default_rng(seed)
    k = len(ALGO_FAMILIES)
    splits: dict[str, list[tuple[str, str, int]]] = {"train": [], "validation": [], "test": []}
    for fam, make in enumerate(ALGO_FAMILIES.values()):
        wanted = {"test": _per_family(num_test, k)[fam], "validation": _per_family(num_validation, k)[fam], "train": _per_family(num_train, k)[fam]}
        total = sum(wanted.values())
        seen: set[str] = set()
        pool: list[tuple[str, str, int]] = []
        for _ in range(50 * total):
            prompt, response = make(rng)
            if prompt not in seen:
                seen.add(prompt)
                pool.append((prompt, response, fam))
                if len(pool) == total:
                    break
        else:
            raise ValueError(f"family {list(ALGO_FAMILIES)[fam]!r} has fewer than {total} distinct prompts")
        start = 0
        for split in ("test", "validation", "train"):
            splits[split] += pool[start : start + wanted[split]]
            start += wanted[split]
    order = np.random.default_rng([seed, 1])
    return SFTData(
        train=encode_pairs(_shuffled(splits["train"], order), seq_len),
        validation=encode_pairs(_shuffled(splits["validation"], order), seq_len),
        test=encode_pairs(_shuffled(splits["test"], order), seq_len),
        families=tuple(ALGO_FAMILIES),
        seq_len=seq_len,
    )


# --------------------------------------------------------------------------------------------
# sft-stdlib: the standard library's functions

#: Families of the stdlib instructions (``_stdlib_pairs``). Measured with full training at the
#: default scale, seeds 0-2, test exact match: ``private`` (leading underscore, not a dunder)
#: 59-79% after the first epoch, 95% after the second; ``count`` (parameters) 90% from the
#: second or third epoch; ``kind`` (method or function) late, reaching 90% in the second to
#: fifth epoch or not at all (66% after six in one seed); ``defname`` (repeat the name) 5% and
#: ``docname`` (the name from the docstring) 2% after six epochs. Copying an identifier is
#: beyond this small model; without pre-training ``defname`` and ``docname`` stay at 0%.
STDLIB_FAMILIES = ("private", "kind", "count", "defname", "docname")
_BALANCED = ("private", "kind")



def _file_split(relative: str) -> str:
    """A standard-library file's split: test files are stdlib-lm's held-out files
    (``make_stdlib_text``), validation files another ~10% carved out of its training files;
    pre-training reads only the rest."""
    bucket = _stdlib_file_bucket(relative)
    return "test" if bucket < _HELD_OUT_BUCKETS else "validation" if bucket < 2 * _HELD_OUT_BUCKETS else "train"


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# A function header: ``def name(`` at the start of a line. The header runs to the first line
# end where it parses; the docstring is the string literal that follows it (after blank and
# comment lines).
_DEF_LINE = re.compile(rb"^[ \t]*def[ \t]+[A-Za-z_]\w*[ \t]*\(", re.M)
_DOCSTRING = re.compile(rb'(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*(?P<literal>[rRuU]?(?P<quote>"""|\'\'\'|"|\'))')


def _parse_header(text: str) -> ast.FunctionDef | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files
        for candidate in (text + "\n pass", text):  # a header alone, or a one-line def
            try:
                node = ast.parse(candidate).body[0]
            except (SyntaxError, ValueError):
                continue
            return node if isinstance(node, ast.FunctionDef) else None
    return None


def _docstring_after(blob: bytes, position: int) -> str:
    found = _DOCSTRING.match(blob, position)
    if found is None:
        return ""
    quote = found.group("quote")
    close = blob.find(quote, found.end()) if len(quote) == 3 else blob.find(b"\n", found.end()) - len(quote)
    if close < 0:
        return ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ast.literal_eval(blob[found.start("literal") : close + len(quote)].decode("utf-8").strip())
    except (SyntaxError, ValueError, UnicodeDecodeError, MemoryError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""


def _file_functions(blob: bytes) -> list[tuple[ast.FunctionDef, str]]:
    """Every ``def`` of a source file with its docstring (``""`` if none).

    Headers are found with a regular expression and each one parsed with ``ast``: parsing
    whole files took 10–20 s for the standard library on the 2-core machine, this about 1 s.
    Both find the same functions and docstrings, plus a few dozen ``def`` lines inside
    string literals (examples in docstrings), which are kept.
    """
    functions = []
    for match in _DEF_LINE.finditer(blob):
        node, position = None, match.start()
        for _ in range(40):  # a header longer than 40 lines is not worth finding
            end = blob.find(b"\n", position)
            end = len(blob) if end < 0 else end
            try:
                text = blob[match.start() : end].decode("utf-8").strip()
            except UnicodeDecodeError:
                break
            node = _parse_header(text)
            if node is not None or end == len(blob):
                break
            position = end + 1
        if node is None:
            continue
        header_only = isinstance(node.body[0], ast.Pass) and len(node.body) == 1
        functions.append((node, _docstring_after(blob, end + 1) if header_only else ""))
    return functions


@functools.lru_cache(maxsize=1)
def _function_records() -> tuple[dict, ...]:
    """Every ``def`` of the standard library: file split, name, parameters, docstring line
    (read once per process; callers must not change the records)."""
    root = _stdlib_root()
    records = []
    for file in _stdlib_files():
        try:
            blob = file.read_bytes()
        except OSError:
            continue
        split = _file_split(file.relative_to(root).as_posix())
        for node, doc in _file_functions(blob):
            args = node.args
            records.append({
                "split": split,
                "name": node.name,
                "params": ast.unparse(args),
                "names": [a.arg for a in (*args.posonlyargs, *args.args)]
                + ([args.vararg.arg] if args.vararg else [])
                + [a.arg for a in args.kwonlyargs]
                + ([args.kwarg.arg] if args.kwarg else []),
                "doc": doc.strip().splitlines()[0].strip() if doc.strip() else "",
            })
    return tuple(records)


def _clip_words(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    return text[: limit + 1].rsplit(" ", 1)[0][:limit].rstrip(" ,;:")


def _stdlib_pairs(record: dict, seq_len: int) -> list[tuple[str, str, str]]:
    """The ``(family, prompt, response)`` instructions one function gives (``STDLIB_FAMILIES``);
    the docstring line is cut at a word boundary to fit ``seq_len``."""
    name, names = record["name"], record["names"]
    signature = f"def {name}({record['params']}):"
    private = name.startswith("_") and not name.endswith("__")
    pairs = [
        ("private", f"{signature}\n# private:", " yes\n" if private else " no\n"),
        ("kind", f"{signature}\n# kind:", " method\n" if names[:1] in (["self"], ["cls"]) else " function\n"),
        ("count", f"{signature}\n# parameters:", f" {len(names)}\n"),
        ("defname", f"{signature}\n# name:", f" {name}\n"),
    ]
    doc = _clip_words(record["doc"], seq_len - len(name) - len("# \ndef ("))
    if len(doc) >= 8:
        pairs.append(("docname", f"# {doc}\ndef ", f"{name}("))
    return pairs


def make_stdlib_sft(num_train: int, num_validation: int, num_test: int, *, seq_len: int = 48, seed: int = 0) -> SFTData:
    """The ``sft-stdlib`` data: instructions about the standard library's functions.

    Splits follow files (``_file_split``): test functions come from stdlib-lm's held-out
    files, validation functions from another ~10% of the files, carved out of the files the
    training data would otherwise use; pre-training reads only the training files. Within a
    family a prompt appears once: a validation prompt that also occurs in training, or a test
    prompt that occurs in training or validation, is dropped (``def __init__(self):`` is
    never asked at test time). Families are balanced; each
    split samples its functions with a generator seeded with ``seed``.
    """
    families = {name: i for i, name in enumerate(STDLIB_FAMILIES)}
    candidates: dict[str, dict[str, dict[str, tuple[str, str, int]]]] = {s: {f: {} for f in STDLIB_FAMILIES} for s in ("train", "validation", "test")}
    for record in _function_records():
        for fam, prompt, response in _stdlib_pairs(record, seq_len):
            if fam not in families or len(prompt) + len(response) > seq_len or not (prompt + response).isascii():
                continue
            candidates[record["split"]][fam].setdefault(prompt, (prompt, response, families[fam]))
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, str, int]]] = {}
    for split, total in (("train", num_train), ("validation", num_validation), ("test", num_test)):
        chosen: list[tuple[str, str, int]] = []
        for fam, wanted in zip(STDLIB_FAMILIES, _per_family(total, len(STDLIB_FAMILIES))):
            earlier = {"train": (), "validation": ("train",), "test": ("train", "validation")}[split]
            pool = {p: v for p, v in candidates[split][fam].items() if not any(p in candidates[e][fam] for e in earlier)}
            # Two-answer families draw both answers equally often, so that a constant answer
            # scores 50% and the exact match measures what was learned.
            answers = sorted({v[1] for v in pool.values()}) if fam in _BALANCED else [None]
            for answer, share in zip(answers, _per_family(wanted, len(answers))):
                keys = sorted(p for p, v in pool.items() if answer is None or v[1] == answer)
                if len(keys) < share:
                    raise ValueError(f"sft-stdlib: only {len(keys)} {split} samples of family {fam!r}, {share} requested")
                chosen += [pool[keys[i]] for i in np.sort(rng.choice(len(keys), size=share, replace=False))]
        out[split] = _shuffled(chosen, rng)
    return SFTData(
        train=encode_pairs(out["train"], seq_len),
        validation=encode_pairs(out["validation"], seq_len),
        test=encode_pairs(out["test"], seq_len),
        families=STDLIB_FAMILIES,
        seq_len=seq_len,
    )
