"""Supervised fine-tuning of a tiny pre-trained LLaMA on instructions about the Python standard
library, once with a plain ``transformers.Trainer`` on the full data and once with
``GekoTrainer``; print the response tokens each run trained, its wall-clock and its held-out
exact match.

    pip install 'geko_core[hf]'
    python examples/sft_stdlib.py --quick            # tiny sizes, well under a minute
    python examples/sft_stdlib.py                    # about a CPU-minute per seed, after pre-training
                                                     # once (about 2 CPU-minutes, then cached)
    python examples/sft_stdlib.py --seeds 3          # mean ± std over seeds 0, 1, 2

Model. A byte-level LLaMA (vocabulary 256, ``LlamaConfig`` / ``LlamaForCausalLM``) built from a
config: nothing is downloaded. It is pre-trained once on next-byte prediction over the
standard library's source and cached in ``geko_core.bench.data.cache_dir()`` (the directory
``GEKO_CACHE_DIR`` names) as ``stdlib_llama_<config>_<hash>.pt.ck``, written atomically and
checksummed with ``save_checked`` / ``load_checked``; a damaged file is rebuilt. The
pre-training routine of ``geko_core.bench.pretrain`` builds geko-bench's own small transformer, not
a Hugging Face model, so its loop is not reused as a whole; what it is made of is: the text
(``_pretrain_text``: only the files the fine-tuning's training split comes from, so held-out
functions are never read in pre-training), the cosine schedule (``geko_core.bench.runner``),
the standard library's fingerprint in the cache key and the checked cache files. The loop
itself (random byte windows, AdamW) is a few lines here.

Data. ``geko_core.bench.sft_data.make_stdlib_sft``: a function header of the standard library and a
question (is it private, a method or a function, how many parameters, its name, its name from
its docstring), the answer as the response. Every example is ``prompt + response`` bytes;
its labels are -100 on the prompt, so only the response is trained. Examples keep their own
length and the collator pads each batch (inputs with the pad byte, labels with -100), as
``DataCollatorForSeq2Seq`` does for tokenized text.

Runs. Both fine-tunings start from the same checkpoint with the same seed, epochs, batch size,
learning rate and cosine schedule; the only change is the trainer class and ``geko_policy``.
Response tokens are counted twice: by the collator (every batch the training loop receives)
and, for GekoTrainer, by its Selector. The plain run's count is checked against every
response token of the training set times the epochs. Held-out figures come from
``geko_core.bench.sft.response_metrics`` on the test split (functions from files neither
pre-training nor fine-tuning read): exact match (every response byte is the argmax under
teacher forcing, i.e. greedy decoding reproduces the response) and response perplexity.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from geko_core import GekoConfig
from geko_core.bench.data import cache_dir, load_checked, save_checked
from geko_core.bench.runner import _lr_at
from geko_core.bench.pretrain import _pretrain_text, _stdlib_fingerprint
from geko_core.bench.sft import response_metrics
from geko_core.bench.sft_data import IGNORE_INDEX, PAD, SFTSplit, make_stdlib_sft
from geko_core.integrations.hf import GekoTrainer

# -- the pre-trained model ------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaPretrain:
    """A byte-level LLaMA and its pre-training run on the standard library's source."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 64
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def file_name(self) -> str:
        """Encodes the configuration, and (hashed) the standard library, torch and transformers
        versions the checkpoint was made with."""
        salt = json.dumps(asdict(self), sort_keys=True) + _stdlib_fingerprint() + torch.__version__.split("+")[0] + transformers.__version__
        digest = hashlib.sha256(salt.encode()).hexdigest()[:12]
        return f"stdlib_llama_h{self.hidden}_l{self.layers}_a{self.heads}_t{self.seq_len}_s{self.steps}_b{self.batch_size}_seed{self.seed}_{digest}.pt.ck"


def build_llama(config: LlamaPretrain, max_len: int) -> LlamaForCausalLM:
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256, hidden_size=config.hidden, intermediate_size=2 * config.hidden,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
            max_position_embeddings=max(config.seq_len, max_len), pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
        )
    )


def pretrain(config: LlamaPretrain, max_len: int) -> dict[str, torch.Tensor]:
    """Next-byte pre-training on random windows of the training files; returns the state."""
    stream = _pretrain_text()
    rng = np.random.default_rng(config.seed)
    model = build_llama(config, max_len)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    offsets = np.arange(config.seq_len)
    started, loss_ema = time.perf_counter(), float("nan")
    report_every = max(config.steps // 10, 1)
    for step in range(config.steps):
        starts = rng.integers(0, len(stream) - config.seq_len, size=config.batch_size)
        batch = torch.from_numpy(stream[starts[:, None] + offsets].astype(np.int64))
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config.lr, step / config.steps)
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        if (step + 1) % report_every == 0 or step + 1 == config.steps:
            print(
                f"  pre-training step {step + 1}/{config.steps}  loss {loss_ema:.3f}  {time.perf_counter() - started:.0f}s",
                file=sys.stderr, flush=True,
            )
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def pretrained_llama_state(config: LlamaPretrain, max_len: int) -> dict[str, torch.Tensor]:
    """The pre-trained state, from the cache or trained now (and cached)."""
    path = cache_dir() / config.file_name()
    payload = load_checked(path)  # None when missing; a damaged file warns and reads as missing
    if payload is not None:
        cached = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if cached.get("config") == asdict(config):
            print(f"pre-trained LLaMA read from {path}", file=sys.stderr)
            return cached["state"]
    print(f"pre-training a byte-level LLaMA ({config.steps} steps; once, cached as {path})", file=sys.stderr, flush=True)
    state = pretrain(config, max_len)
    buffer = io.BytesIO()
    torch.save({"config": asdict(config), "state": state}, buffer)
    save_checked(path, buffer.getvalue())
    return state


# -- data -----------------------------------------------------------------------------------------


class Instructions(torch.utils.data.Dataset):
    """One split of the instructions as causal-LM examples of their own length: ``input_ids``
    prompt + response bytes, ``labels`` -100 on the prompt (the model's loss shifts them)."""

    def __init__(self, split: SFTSplit) -> None:
        lengths = split.prompt_len + split.response_tokens
        self.items = [
            {"input_ids": split.inputs[i, :n].tolist(), "labels": split.labels[i, :n].tolist()} for i, n in enumerate(lengths)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


class PadCollator:
    """Pads a batch to its longest example: inputs with the pad byte (masked out of attention),
    labels with -100. Counts the response tokens it hands to training: the labels that are not
    -100 after the causal shift, i.e. the tokens the loss trains."""

    def __init__(self) -> None:
        self.response_tokens = 0
        self.sequences = 0

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), PAD, dtype=torch.int64)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.int64)
        mask = torch.zeros((len(features), longest), dtype=torch.int64)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        self.response_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.sequences += len(features)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class EpochTokens(TrainerCallback):
    """Response tokens the collator delivered in each epoch."""

    def __init__(self, collator: PadCollator) -> None:
        self.collator = collator
        self.per_epoch: list[int] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.per_epoch.append(self.collator.response_tokens - sum(self.per_epoch))
        return control


class Logits(torch.nn.Module):
    """A Hugging Face causal LM as a function of the input ids returning logits, the interface
    ``response_metrics`` evaluates."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


# -- one fine-tuning ----------------------------------------------------------------------------


def finetune(kind: str, seed: int, options: argparse.Namespace, state: dict, pre: LlamaPretrain, train: Instructions, test: SFTSplit, families: tuple[str, ...], max_len: int) -> dict:
    model = build_llama(pre, max_len)
    model.load_state_dict(state)
    collator = PadCollator()
    epochs = EpochTokens(collator)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, num_train_epochs=options.epochs, per_device_train_batch_size=options.batch_size,
            learning_rate=options.lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
            logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            seed=seed, dataloader_pin_memory=False, remove_unused_columns=False,
        )
        common = dict(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[epochs])
        if kind == "plain":
            trainer = Trainer(**common)
        else:
            trainer = GekoTrainer(
                **common, geko_policy=options.policy,
                # The default: a response counts as right only when all of its bytes are.
                geko_config=GekoConfig(correct_threshold=options.correct_threshold),
            )
        trainer.remove_callback(PrinterCallback)  # the Trainer's own log lines; the figures are printed below
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    figures = response_metrics(Logits(model), test, families)
    result = {
        "run": kind if kind == "plain" else options.policy,
        "seed": seed,
        "steps": output.global_step,
        "seconds": seconds,
        "sequences": collator.sequences,
        "tokens": collator.response_tokens,
        "epoch_tokens": epochs.per_epoch,
        "exact": figures["exact_match_%"],
        "ppl": figures["perplexity"],
        "families": {name: f["exact_match_%"] for name, f in figures["families"].items()},
    }
    if kind != "plain":
        metrics = trainer.selector.metrics()
        result.update(
            selector_forwarded=metrics["forwarded_tokens"], selector_backpropagated=metrics["backpropagated_tokens"],
            buckets=metrics["buckets"],
        )
    return result


# -- report ---------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def cell(values: list[float], digits: int) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--policy", default="geko", help="GekoTrainer's policy (geko, infobatch, random_subset, uniform)")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune with seeds 0..K-1 and report mean ± std")
    parser.add_argument("--correct-threshold", type=float, default=1.0, help="share of response bytes right for a sample to count as right")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pre-training steps (default 2000; --quick 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain little from more)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a rough pre-training and a small fine-tuning set")
    options = parser.parse_args(argv)
    if options.quick:
        options.num_train = min(options.num_train, 120)
        options.num_test = min(options.num_test, 60)
        options.epochs = min(options.epochs, 2)
    if options.seeds < 1 or options.epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()
    began = time.perf_counter()

    steps = options.pretrain_steps if options.pretrain_steps is not None else (30 if options.quick else 2000)
    pre = LlamaPretrain(steps=steps)
    # The validation split is not used here (nothing is tuned); make_stdlib_sft wants a size.
    data = make_stdlib_sft(options.num_train, 10, options.num_test)
    max_len = data.seq_len
    state = pretrained_llama_state(pre, max_len)
    train = Instructions(data.train)
    response_total = int(data.train.response_tokens.sum())
    print(
        f"sft-stdlib: {len(data.train)} training and {len(data.test)} held-out instructions "
        f"({response_total} response tokens in the training set); byte-level LLaMA hidden {pre.hidden}, "
        f"{pre.layers} layers, pre-trained {pre.steps} steps; {options.epochs} epochs, batch {options.batch_size}, "
        f"lr {options.lr}, {options.seeds} seed(s)"
    )

    runs: dict[str, list[dict]] = {"plain": [], "selected": []}
    for seed in range(options.seeds):
        for kind in ("plain", "selected"):
            result = finetune(kind, seed, options, state, pre, train, data.test, data.families, max_len)
            runs[kind].append(result)
            print(
                f"  seed {seed} {result['run']:<8} {result['tokens']:>8} response tokens  {result['seconds']:6.1f}s  "
                f"exact match {result['exact']:5.1f}%  ppl {result['ppl']:.3f}",
                flush=True,
            )

    plain, selected = runs["plain"], runs["selected"]
    full_tokens = response_total * options.epochs
    name = selected[0]["run"]
    print(f"\n{'run':<10}{'response tokens':>17}{'saved':>16}{'train seconds':>18}{'exact match %':>18}{'response ppl':>20}")
    for label, rows in (("plain", plain), (name, selected)):
        saved = [1.0 - r["tokens"] / full_tokens for r in rows]
        print(
            f"{label:<10}{cell([r['tokens'] for r in rows], 0):>17}{cell([100 * s for s in saved], 1) + '%':>16}"
            f"{cell([r['seconds'] for r in rows], 1):>18}{cell([r['exact'] for r in rows], 1):>18}{cell([r['ppl'] for r in rows], 3):>20}"
        )
    print("(response tokens forwarded = back-propagated in both runs; counted by the collator)")

    print("\nheld-out exact match % per family:")
    for label, rows in (("plain", plain), (name, selected)):
        print(f"  {label:<8}" + "  ".join(f"{fam} {cell([r['families'][fam] for r in rows], 1)}" for fam in data.families))

    print("\nchecks:")
    print(f"  plain: every response token x epochs = {response_total} x {options.epochs} = {full_tokens}; "
          f"counted {[r['tokens'] for r in plain]} ({'equal' if all(r['tokens'] == full_tokens for r in plain) else 'NOT equal'})")
    agree = all(r["tokens"] == r["selector_backpropagated"] == r["selector_forwarded"] for r in selected)
    print(f"  {name}: collator {[r['tokens'] for r in selected]}, Selector back-propagated "
          f"{[r['selector_backpropagated'] for r in selected]}, forwarded {[r['selector_forwarded'] for r in selected]} "
          f"({'agree' if agree else 'DISAGREE'})")
    print(f"  {name} response tokens per epoch (seed 0): {selected[0]['epoch_tokens']}; plain: {plain[0]['epoch_tokens']}")
    print(f"  {name} buckets at the end (seed 0): {selected[0]['buckets']}")

    delta_exact = statistics.fmean(r["exact"] for r in selected) - statistics.fmean(r["exact"] for r in plain)
    saved = 1.0 - statistics.fmean(r["tokens"] for r in selected) / full_tokens
    faster = 1.0 - statistics.fmean(r["seconds"] for r in selected) / statistics.fmean(r["seconds"] for r in plain)
    print(
        f"\ncomparison: {name} back-propagated {abs(saved):.1%} {'fewer' if saved >= 0 else 'MORE'} response tokens than plain training, "
        f"took {abs(faster):.1%} {'less' if faster >= 0 else 'more'} training wall-clock (noisy on a shared machine), "
        f"exact match {delta_exact:+.1f} pt."
    )
    if options.seeds == 1:
        print("verdict: one seed, so the spread over seeds is not measured and this exact-match difference "
              "cannot be told from noise (run --seeds 3).")
    else:
        spread = math.hypot(mean_std([r["exact"] for r in plain])[1], mean_std([r["exact"] for r in selected])[1])
        within = abs(delta_exact) <= spread
        print(
            f"verdict: the exact-match difference {delta_exact:+.1f} pt is "
            f"{'within' if within else 'outside'} the seed spread (±{spread:.1f} pt over {options.seeds} seeds)"
            + ("; it is noise." if within else ".")
        )
    print(f"total wall-clock {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
