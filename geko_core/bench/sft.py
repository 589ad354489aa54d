"""Supervised fine-tuning tasks for geko-bench (docs/design.md §6).

Every sample is a byte sequence ``prompt + response`` padded with ``PAD`` to a fixed length
``T``. ``labels`` hold the response bytes at their own positions and -100 on the prompt and
the padding, aligned with ``inputs``: the loss applies the causal shift
(``sel.loss(logits, labels, idx, shift=True)``), so only the response is trained. Each sample
belongs to a family (``family`` ids index ``families``), and every task has disjoint train,
validation and test splits, the validation split carved out of the training data.

* ``sft-algo``: string and number instructions generated from a seed (``len abc=`` → ``3``,
  ``rev abcde=`` → ``edcba``, ...), from a family learned in the first epoch to two never
  learned within the epoch budget (two-digit addition, a hash).
* ``sft-stdlib``: a small byte-level transformer pre-trained on the standard library's source
  (cached on disk after the first run), then fine-tuned on instructions about the functions
  of the same source (headers parsed with ``ast``): whether a ``def`` is private, whether it
  is a method, its parameter count, its name repeated, and its name from its docstring.
  Validation and test functions come from files the pre-training never read.

Metrics (``response_metrics``): exact match of the response (every response token is the
argmax under teacher forcing, which is what greedy decoding reproduces) and response-token
perplexity, overall and per family.

``python -m geko_core.bench.sft sft-algo --scale quick`` trains a task with plain full
training and prints the exact match of every family after every epoch.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import io
import json
import math
import re
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import _HELD_OUT_BUCKETS, _stdlib_file_bucket, _stdlib_files, cache_dir, load_checked, save_checked

__all__ = [
    "ALGO_FAMILIES",
    "STDLIB_FAMILIES",
    "PretrainConfig",
    "SFTData",
    "SFTSplit",
    "encode_pairs",
    "make_algo_sft",
    "make_sft_task",
    "make_stdlib_sft",
    "pretrained_stdlib_lm",
    "response_metrics",
]

if TYPE_CHECKING:
    from .tasks import Task

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
#: with full training at the default scale, seeds 0-2 (``python -m geko_core.bench.sft
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


def _stdlib_fingerprint() -> str:
    """Changes when the standard library's file list, sizes or Python version change."""
    root = _stdlib_root()
    digest = hashlib.sha256(f"{sys.version_info[0]}.{sys.version_info[1]}".encode())
    for path in _stdlib_files():
        try:
            size = path.stat().st_size
        except OSError:
            continue
        digest.update(f"{path.relative_to(root).as_posix()}:{size}\n".encode())
    return digest.hexdigest()[:16]


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


# --------------------------------------------------------------------------------------------
# Pre-training on the standard library's source, cached


@dataclass(frozen=True)
class PretrainConfig:
    """The pre-trained byte LM: its architecture and its pre-training run."""

    seq_len: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    steps: int = 2000
    batch_size: int = 16
    lr: float = 6e-3
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + _stdlib_fingerprint() + torch.__version__.split("+")[0]
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pretrain_text() -> np.ndarray:
    """uint8 bytes of the training files only (``_file_split``), joined by newlines."""
    root = _stdlib_root()
    chunks = []
    for path in _stdlib_files():
        if _file_split(path.relative_to(root).as_posix()) != "train":
            continue
        try:
            chunks.append(path.read_bytes())
        except OSError:
            continue
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


def _byte_lm(config: PretrainConfig) -> nn.Module:
    from .tasks import _ByteLM

    return _ByteLM(config.seq_len, width=config.width, layers=config.layers, heads=config.heads)


def _pretrain(config: PretrainConfig, progress: bool) -> dict[str, torch.Tensor]:
    """Next-byte pre-training on random windows of the training files; returns the state."""
    from .runner import _lr_at

    stream = _pretrain_text()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    model = _byte_lm(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    width = config.seq_len + 1
    offsets = np.arange(width)
    started = time.perf_counter()
    loss_ema = float("nan")
    for step in range(config.steps):
        starts = rng.integers(0, len(stream) - width, size=config.batch_size)
        batch = torch.from_numpy(stream[starts[:, None] + offsets].astype(np.int64))
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config.lr, step / config.steps)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        if progress and (step % 10 == 0 or step == config.steps - 1):
            done = (step + 1) / config.steps
            bar = "#" * int(28 * done)
            sys.stderr.write(
                f"\r[{bar:.<28}] pre-training the stdlib byte LM (once; cached)  step {step + 1}/{config.steps}"
                f"  loss {loss_ema:.2f}  {time.perf_counter() - started:4.0f}s"
            )
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def pretrained_stdlib_lm(config: PretrainConfig = PretrainConfig(), *, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a byte LM pre-trained on the standard library's training files.

    Trained once per configuration (and standard library, and torch version), then read from
    ``cache_dir()``. The cache file carries a SHA-256 of its content: a truncated or
    corrupted file is refused with a warning and rebuilt. The default configuration reaches
    a held-out byte perplexity of about 5.0 in about 2 minutes on one core of the 2-core
    machine.

    Args:
        config: architecture and pre-training run.
        progress: a progress bar on stderr; by default one when stderr is a terminal, and
            otherwise a line when pre-training starts and one when it ends.
    """
    path = cache_dir() / f"stdlib_lm_{config.key()}.pt.ck"
    payload = load_checked(path)
    if payload is not None:
        cached = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if cached.get("config") == asdict(config):
            return cached["state"]
        warnings.warn(f"{path} holds another configuration; pre-training again", RuntimeWarning, stacklevel=2)
    announce = progress is None and not sys.stderr.isatty()
    if announce:
        sys.stderr.write(f"pre-training the stdlib byte LM ({config.steps} steps; once, cached in {path.parent})\n")
    started = time.perf_counter()
    state = _pretrain(config, bool(progress) if progress is not None else sys.stderr.isatty())
    if announce:
        sys.stderr.write(f"pre-trained in {time.perf_counter() - started:.0f}s\n")
    buffer = io.BytesIO()
    torch.save({"config": asdict(config), "state": state}, buffer)
    save_checked(path, buffer.getvalue())
    return state


# --------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def sample_responses(model: nn.Module, split: SFTSplit, *, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of ``split``: bool ``[N]``, every response token the argmax of the logits at
    the position before it (teacher forcing), and float64 ``[N]``, the summed negative
    log-likelihood of its response tokens."""
    was_training = model.training
    model.eval()
    inputs = torch.from_numpy(split.inputs)
    labels = torch.from_numpy(split.labels)
    exact = np.zeros(len(split), dtype=bool)
    nll = np.zeros(len(split), dtype=np.float64)
    for start in range(0, len(split), batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        logits = model(x)[:, :-1].float()
        target = y[:, 1:]
        counted = target != IGNORE_INDEX
        token_nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        right = (logits.argmax(-1) == target) | ~counted
        exact[start : start + len(x)] = right.all(dim=1).numpy()
        nll[start : start + len(x)] = token_nll.double().sum(dim=1).numpy()
    model.train(was_training)
    return exact, nll


def response_metrics(model: nn.Module, split: SFTSplit, families: tuple[str, ...], *, batch_size: int = 512) -> dict:
    """Exact match and response-token perplexity of a causal LM on a split.

    A response is an exact match when every response token is the argmax of the logits at
    the position before it (teacher forcing), which is exactly when greedy decoding from
    the prompt reproduces it. Perplexity is exp of the mean negative log-likelihood over
    response tokens.

    Returns:
        ``{"exact_match_%", "perplexity", "samples", "families": {name: {the same}}}``.
    """
    exact, nll = sample_responses(model, split, batch_size=batch_size)
    tokens = split.response_tokens

    def figures(mask: np.ndarray) -> dict:
        count = int(mask.sum())
        return {
            "exact_match_%": 100.0 * float(exact[mask].mean()) if count else float("nan"),
            "perplexity": math.exp(nll[mask].sum() / tokens[mask].sum()) if count else float("nan"),
            "samples": count,
        }

    result = figures(np.ones(len(split), dtype=bool))
    result["families"] = {name: figures(split.family == f) for f, name in enumerate(families)}
    return result


# --------------------------------------------------------------------------------------------
# Tasks


#: Per scale: (train, validation, test) samples and epochs. One full-training run with an
#: evaluation per epoch, one thread of the 2-core machine: sft-algo 1 s (smoke), 4 s (quick),
#: 14 s (default); sft-stdlib 1 s, 5 s, 20 s. Quick and default share one pre-trained model
#: (about 2 minutes, once); smoke pre-trains a rough one in a second or two.
_ALGO_SCALES = {"smoke": (480, 160, 160, 2), "quick": (1600, 512, 1024, 4), "default": (3200, 1024, 2048, 6)}
_STDLIB_SCALES = {"smoke": (250, 100, 100, 2), "quick": (1000, 500, 500, 4), "default": (2000, 1000, 1000, 6)}
_PRETRAIN = {"smoke": PretrainConfig(steps=20, batch_size=16), "quick": PretrainConfig(), "default": PretrainConfig()}


def make_sft_task(name: str, scale: str) -> "Task":
    """``sft-algo`` or ``sft-stdlib`` at ``smoke``, ``quick`` or ``default`` scale: byte-level
    2-layer transformers (width 64), AdamW with the runner's cosine schedule. The batch sizes
    (16 and 8) give the first epoch enough steps for the easy families to be learned in it
    (measured: with twice the batch they come a good part of an epoch later)."""
    from .tasks import Task, _ByteLM

    if name == "sft-algo":
        n_train, n_val, n_test, epochs = _ALGO_SCALES[scale]
        data = make_algo_sft(n_train, n_val, n_test)

        def make_model(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            model = _ByteLM(data.seq_len)
            # Random positions: with zero-initialised ones the positional families
            # (first, rev, max) were learned about three epochs later (measured).
            nn.init.normal_(model.position, std=0.5)
            return model

        lr, batch_size = 3e-3, 16
        # Chosen on the validation split over 6 seeds (docs/tuning.md, "Per-task settings
        # re-searched"). No setting met the rule's 0.5 pt there, the defaults included; this is
        # the one with the smallest shortfall.
        geko_options = {"stall_visits": 2, "freeze_streak": 2}
    elif name == "sft-stdlib":
        n_train, n_val, n_test, epochs = _STDLIB_SCALES[scale]
        pretrain = _PRETRAIN[scale]
        data = make_stdlib_sft(n_train, n_val, n_test)
        state = pretrained_stdlib_lm(pretrain)

        def make_model(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            model = _byte_lm(pretrain)
            model.load_state_dict(state)
            return model

        lr, batch_size = 3e-3, 8
        # Chosen on the validation split by the rule of docs/tuning.md, over 6 seeds ("Per-task
        # settings re-searched": 21.8% of the response tokens saved, exact match +1.0 pt). The
        # budget of one epoch's tokens is a cap, not a cut: no epoch costs more than a full
        # one (the PEAK phase's HARD oversampling otherwise can).
        geko_options = {"stall_visits": 2, "freeze_streak": 2, "final_full": 0.0, "budget": 1.0, "budget_unit": "tokens"}
    else:
        raise ValueError(f"unknown fine-tuning task {name!r}; choose sft-algo or sft-stdlib")

    def detail(model: nn.Module, split: str = "test") -> dict:
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        return response_metrics(model, getattr(data, split), data.families)

    return Task(
        name=name,
        inputs=torch.from_numpy(data.train.inputs),
        targets=torch.from_numpy(data.train.labels),
        make_model=make_model,
        evaluate=lambda model: detail(model, "test")["exact_match_%"],
        metric_name="exact_match_%",
        higher_is_better=True,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        shift=True,
        evaluate_validation=lambda model: detail(model, "validation")["exact_match_%"],
        evaluate_detail=detail,
        families=data.families,
        family=torch.from_numpy(data.train.family),
        policy_options={"geko": geko_options},
    )


# --------------------------------------------------------------------------------------------
# Learning curves of plain full training


def train_full(
    task: "Task",
    seed: int = 0,
    *,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    skip: np.ndarray | None = None,
) -> nn.Module:
    """Plain full training of a fine-tuning task as geko-bench's "full" runs it: AdamW, the
    runner's cosine schedule, a fresh shuffle per epoch, the causal shift and the label mask.
    ``on_epoch(epoch, model)`` is called after every epoch.

    ``skip``: bool ``[epochs, N]``, samples left out of an epoch (neither forwarded nor
    back-propagated; ``benchmarks/sft_oracle.py``). Every epoch still draws its shuffle, so
    the kept samples come in the full run's order, and the learning rate follows the epoch's
    own progress over what it keeps; an epoch that keeps nothing takes no step. Every kept
    sample is trained exactly once in its epoch."""
    from .runner import _flat_ce, _lr_at

    n = task.num_samples
    if skip is not None and (skip.dtype != np.bool_ or skip.shape != (task.epochs, n)):
        raise ValueError(f"skip must be bool [epochs, N] = [{task.epochs}, {n}], got {skip.dtype} {list(skip.shape)}")
    torch.manual_seed(seed)
    model = task.make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(task.epochs):
        order = torch.randperm(n, generator=generator)
        if skip is not None and skip[epoch].any():
            order = order[torch.from_numpy(~skip[epoch])[order]]
        m = len(order)
        for start in range(0, m, task.batch_size):
            idx = order[start : start + task.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(task.lr, (epoch + start / m) / task.epochs)
            loss = _flat_ce(model(task.inputs[idx]), task.targets[idx], task.shift)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geko_core.bench.sft", description="Per-family exact match of plain full training, after every epoch.")
    parser.add_argument("task", choices=("sft-algo", "sft-stdlib"))
    parser.add_argument("--scale", default="quick", choices=("smoke", "quick", "default"))
    parser.add_argument("--seeds", default="0", help="comma list of seeds")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .tasks import make_task

    started = time.perf_counter()
    task = make_task(args.task, args.scale)
    print(f"{task.name} ({args.scale}): {task.num_samples} train samples, {task.epochs} epochs; built in {time.perf_counter() - started:.1f}s")
    for seed in (int(s) for s in args.seeds.split(",")):
        header = f"{'epoch':>5} " + " ".join(f"{f:>8}" for f in task.families) + f" {'all':>8} {'ppl':>6} {'elapsed':>7}"
        print(f"\nseed {seed}, {args.split} exact match % per family\n{header}")
        began = time.perf_counter()

        def report(epoch: int, model: nn.Module, began: float = began) -> None:
            figures = task.evaluate_detail(model, args.split)
            cells = " ".join(f"{figures['families'][f]['exact_match_%']:8.1f}" for f in task.families)
            print(f"{epoch:>5} {cells} {figures['exact_match_%']:8.1f} {figures['perplexity']:6.2f} {time.perf_counter() - began:6.1f}s", flush=True)

        train_full(task, seed, on_epoch=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
