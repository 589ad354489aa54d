"""Fine-tune a tiny causal language model with ``transformers.Trainer`` on the Python standard
library's source, once on the full data (uniform) and once with geko; print the savings.

    pip install 'geko_core[hf]'
    python examples/hf_stdlib_finetune.py            # about a minute on a laptop CPU
    python examples/hf_stdlib_finetune.py --epochs 12 --num-train 3072 --policy infobatch

The model is a randomly initialised byte-level LLaMA (vocabulary 256, two layers) built from a
config: nothing is downloaded. The data are non-overlapping byte windows of the standard
library's ``.py`` files (``geko_core.bench.data.make_stdlib_text``); held-out windows come from
other files. The only change from a plain ``Trainer`` is the class name and ``geko_policy``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments

from geko_core import GekoConfig
from geko_core.bench.data import make_stdlib_text
from geko_core.integrations.hf import GekoTrainer


class ByteWindows(torch.utils.data.Dataset):
    """Byte windows as causal-LM examples: the labels are the inputs (the loss shifts them)."""

    def __init__(self, windows: np.ndarray) -> None:
        self.windows = torch.from_numpy(windows.astype(np.int64))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.windows[index]
        return {"input_ids": ids, "labels": ids}


def make_model(arch: str, hidden: int, seq_len: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=256, n_embd=hidden, n_layer=2, n_head=4, n_positions=seq_len + 1)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len + 1,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 128) -> float:
    """exp(mean next-byte cross-entropy) over the held-out windows."""
    model.eval()
    data = torch.from_numpy(windows.astype(np.int64))
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        targets = chunk[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return math.exp(total / count)


def run(policy: str, options: argparse.Namespace, train: ByteWindows, test: np.ndarray, policy_options: dict | None = None) -> dict:
    model = make_model(options.arch, options.hidden, options.seq_len, options.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, num_train_epochs=options.epochs, per_device_train_batch_size=options.batch_size,
            learning_rate=options.lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
            logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            seed=options.seed, dataloader_pin_memory=False,
        )
        trainer = GekoTrainer(
            model=model, args=args, train_dataset=train, geko_policy=policy, geko_options=policy_options,
            # A byte-level sequence counts as learnt once most of its bytes are predicted
            # (as in geko-bench's stdlib-lm task).
            geko_config=GekoConfig(correct_threshold=options.correct_threshold),
        )
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    metrics = trainer.selector.metrics()
    return {
        "policy": policy,
        "backpropagated": metrics["backpropagated"],
        "saved_fraction": metrics["saved_fraction"],
        "steps": output.global_step,
        "seconds": seconds,
        "train_loss": output.training_loss,
        "perplexity": perplexity(model, test),
        "epochs": [h["epoch_backpropagated"] for h in trainer.selector.history] + [None],
        "buckets": metrics["buckets"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-test", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--correct-threshold", type=float, default=0.6)
    parser.add_argument("--policy", default="geko", help="policy compared with uniform (geko, infobatch, random_subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-random-subset", action="store_true", help="skip the random subset of the same budget (the second baseline)"
    )
    options = parser.parse_args()

    data = make_stdlib_text(options.num_train, options.num_test, seq_len=options.seq_len, seed=options.seed)
    print(
        f"standard-library text: {len(data.train)} training and {len(data.test)} held-out windows of "
        f"{options.seq_len + 1} bytes ({data.num_train_files} / {data.num_test_files} files); "
        f"{options.arch}, hidden {options.hidden}, {options.epochs} epochs, batch {options.batch_size}"
    )
    train = ByteWindows(data.train)
    results = [run(policy, options, train, data.test) for policy in ("uniform", options.policy)]
    full, selected = results
    if not options.no_random_subset:
        # The same number of back-propagated sequences, chosen without looking at the data.
        budget = selected["backpropagated"] / full["backpropagated"]
        results.append(run("random_subset", options, train, data.test, {"budget": min(budget, 1.0)}))

    print(f"\n{'policy':<14}{'back-propagated':>16}{'saved':>8}{'steps':>7}{'seconds':>9}{'held-out ppl':>14}")
    for r in results:
        print(
            f"{r['policy']:<14}{r['backpropagated']:>16}{r['saved_fraction']:>8.1%}{r['steps']:>7}"
            f"{r['seconds']:>9.1f}{r['perplexity']:>14.3f}"
        )
    print(f"\n{selected['policy']} sequences per epoch: {selected['epochs'][:-1]} (last epoch not listed)")
    print(f"{selected['policy']} buckets at the end: {selected['buckets']}")
    fewer = 1.0 - selected["backpropagated"] / full["backpropagated"]
    faster = 1.0 - selected["seconds"] / full["seconds"]
    change = selected["perplexity"] / full["perplexity"] - 1.0
    print(
        f"{selected['policy']} back-propagated {fewer:.1%} fewer sequences than uniform, in {faster:.1%} less "
        f"training time (wall-clock is noisy on a shared machine), at {change:+.2%} held-out perplexity."
    )
    if len(results) == 3:
        subset = results[2]
        print(f"A random subset of the same budget reaches perplexity {subset['perplexity']:.3f} ({subset['perplexity'] / full['perplexity'] - 1.0:+.2%}).")


if __name__ == "__main__":
    main()
