"""One GRPO policy-gradient step on the fused log-probability path against the plain log-softmax
path, at an LLM-like head (CPU): the built-in RL loop's and GekoGRPOTrainer's log-probabilities.

Both steps run the project's own code at ``[512 completions x 8 tokens = 4096 tokens, d = 1024 ->
V = 32000]`` (the backbones have no blocks, so the head and the loss are the step), forward +
backward (``torch.autograd.grad`` over the trainable parameters):

* ``loop``: ``rl-algo``'s policy (``rl_model.TinyLM``, width 1024, no blocks, its head widened
  to 32000 classes, with bias) and its GRPO loss (token-mean over the completion tokens) at the
  sampling temperature 1: the loop's ``rl_model.completion_policy_loss`` (``linear_policy_loss``:
  the loss's gradients made in the forward's chunked pass) against the plain
  ``log_softmax(model.head(h).float()).gather(...)`` + ``rl_grpo.grpo_loss``, and against
  ``rl_model.completion_logprobs`` (``linear_logprobs``, no entropy) + ``grpo_loss``, which forms
  each chunk's logits again in the backward.
* ``trl``: a LLaMA (``transformers.LlamaForCausalLM``, hidden 1024, no decoder layers, an
  untied 32000 x 1024 head without bias, the embedding frozen) called as TRL 1.16's
  ``GRPOTrainer._get_per_token_logps_and_entropies`` calls it (``fused_lm_head=True``, the
  prompt positions labelled -100, 8 prompt + 8 completion tokens), log-probabilities and
  entropy at temperature 0.9, the same clipped loss: GekoGRPOTrainer's head
  (``integrations._trl_logprobs.use_linear_logprobs``) against the plain path TRL used before
  its fused head (the model's logits of the completion positions, ``/ τ``, ``log_softmax``,
  ``gather``, the entropy without gradient), and TRL's own fused head
  (``trl.trainer.utils.add_fused_lm_head``, what GRPOTrainer runs without this project).

Every completion token is kept by default, so the figures compare the fusion alone;
``GEKO_BENCH_KEEP`` (a share in (0, 1]) cuts completions short at random to keep about that
share of the tokens, as real completions end early: the fused paths then skip the masked
positions, the plain ones compute them and mask them out.

Goal (issue 24): the fused path uses at least 5x less peak memory than the plain one, at least
as fast. Memory and time come from ``bench_linear_logprobs.run_variant`` (each variant in a
fresh process: the peak-RSS growth of an untimed run over the inputs, then one timed run),
the variants taking turns, ``GEKO_BENCH_REPEATS`` rounds (default 1), medians.

    python benchmarks/bench_rl_logprobs.py          # GEKO_BENCH_STEPS=loop,trl  GEKO_BENCH_DTYPES=fp32,bf16
    GEKO_BENCH_ROWS=128 python benchmarks/bench_rl_logprobs.py   # 128 completions (1024 tokens)
    GEKO_BENCH_SMALL=1 python benchmarks/bench_rl_logprobs.py    # [1024 tokens, 256 -> 8000], seconds
"""

from __future__ import annotations

import os
import statistics
from typing import Callable

import torch

SMALL = os.environ.get("GEKO_BENCH_SMALL", "0") not in ("", "0")
ROWS, T, DIM, VOCAB = (128, 8, 256, 8000) if SMALL else (512, 8, 1024, 32000)
ROWS = int(os.environ.get("GEKO_BENCH_ROWS", ROWS))
PROMPT = 8
KEEP = float(os.environ.get("GEKO_BENCH_KEEP", "1"))
REPEATS = int(os.environ.get("GEKO_BENCH_REPEATS", "1"))
TRL_TEMPERATURE = 0.9
DTYPES = {
    name: dtype
    for name, dtype in {"fp32": torch.float32, "bf16": torch.bfloat16}.items()
    if name in os.environ.get("GEKO_BENCH_DTYPES", "fp32,bf16").split(",")
}
STEPS = tuple(os.environ.get("GEKO_BENCH_STEPS", "loop,trl").split(","))


def _lengths(generator: torch.Generator) -> torch.Tensor:
    """Completion lengths in [1, T]: all T with ``KEEP`` 1, else cut at random to keep about that share."""
    if KEEP >= 1.0:
        return torch.full((ROWS,), T, dtype=torch.int64)
    cut = torch.rand(ROWS, generator=generator) < 2 * (1 - KEEP)
    return torch.where(cut, torch.randint(1, T + 1, (ROWS,), generator=generator), torch.full((ROWS,), T))


# -- the built-in loop: rl_model.TinyLM and rl_grpo.grpo_loss ---------------------------------------


def _loop_inputs(dtype: torch.dtype):
    from torch import nn

    from geko_core.bench.rl_data import VOCAB as SMALL_VOCAB
    from geko_core.bench.rl_model import TinyLM, token_mask

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyLM(PROMPT + T, width=DIM, layers=0, heads=4)
    model.head = nn.Linear(DIM, VOCAB)
    model.to(dtype)
    # TinyLM's embedding reads its own small vocabulary: the sampled ids stay inside it.
    prompts = torch.randint(0, len(SMALL_VOCAB), (ROWS, PROMPT), generator=generator)
    completions = torch.randint(0, len(SMALL_VOCAB), (ROWS, T), generator=generator)
    mask = token_mask(_lengths(generator), T)
    advantages = torch.randn(ROWS, generator=generator)
    return model, prompts, completions, mask, advantages


def _loop_step(logprobs_of: Callable) -> Callable:
    def step(model, prompts, completions, mask, advantages):
        from geko_core.bench.rl_grpo import grpo_loss

        logp = logprobs_of(model, prompts, completions, mask)
        loss = grpo_loss(logp, logp.detach(), advantages, mask)
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    return step


def _loop_policy_loss(model, prompts, completions, mask, advantages):
    from geko_core.bench.rl_model import completion_policy_loss

    loss = completion_policy_loss(model, prompts, completions, advantages, mask=mask, temperature=1.0)
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def _loop_fused(model, prompts, completions, mask):
    from geko_core.bench.rl_model import completion_logprobs

    return completion_logprobs(model, prompts, completions, mask=mask, temperature=1.0)


def _loop_plain(model, prompts, completions, mask):
    h = model.hidden(torch.cat((prompts, completions[:, :-1]), dim=1))[:, PROMPT - 1 :]
    logp = torch.log_softmax(model.head(h).float(), dim=-1)
    return logp.gather(2, completions[..., None]).squeeze(2)


# -- GekoGRPOTrainer: TRL's fused forward with linear_logprobs, TRL's own, and the plain logits -----


def _llama(dtype: torch.dtype, head: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=DIM, num_hidden_layers=0, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=PROMPT + T, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.get_input_embeddings().weight.requires_grad_(False)  # the head's cost, not the embedding's gradient
    if head in ("geko", "trl"):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=TRL_TEMPERATURE, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    if head == "geko":
        from geko_core.integrations._trl_logprobs import use_linear_logprobs

        assert use_linear_logprobs(model, TRL_TEMPERATURE, False, entropy=True) == "linear_logprobs"
    return model


def _trl_inputs(head: str) -> Callable:
    def make(dtype: torch.dtype):
        from geko_core.bench.rl_model import token_mask

        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, VOCAB, (ROWS, PROMPT + T), generator=generator)
        completion_mask = token_mask(_lengths(generator), T)
        attention = torch.cat((torch.ones(ROWS, PROMPT, dtype=torch.int64), completion_mask.long()), dim=1)
        advantages = torch.randn(ROWS, generator=generator)
        return _llama(dtype, head), ids, attention, completion_mask, advantages

    return make


def _trl_fused(model, ids, attention, completion_mask, advantages):
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-T] = -100  # only the completion tokens are scored
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -T:], out.entropy[:, -T:]


def _trl_plain(model, ids, attention, completion_mask, advantages):
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=T + 1).logits[:, :-1] / TRL_TEMPERATURE
    logp = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(2, ids[:, -T:, None]).squeeze(2), entropy


def _trl_step(logprobs_of: Callable) -> Callable:
    def step(model, ids, attention, completion_mask, advantages):
        from geko_core.bench.rl_grpo import grpo_loss

        logp, entropy = logprobs_of(model, ids, attention, completion_mask, advantages)
        loss = grpo_loss(logp, logp.detach(), advantages, completion_mask)
        assert torch.isfinite(entropy).all()
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    return step


#: step -> (fused variant, plain variant, other variants)
PAIRS = {
    "loop": (
        "loop: completion_policy_loss (linear_policy_loss)", "loop: plain log_softmax",
        ("loop: completion_logprobs (linear_logprobs)",),
    ),
    "trl": ("trl: GekoGRPOTrainer (linear_logprobs)", "trl: plain logits + log_softmax", ("trl: TRL's own fused head",)),
}
_RUNS: dict[str, tuple[Callable, Callable]] = {
    PAIRS["loop"][0]: (_loop_inputs, _loop_policy_loss),
    PAIRS["loop"][1]: (_loop_inputs, _loop_step(_loop_plain)),
    PAIRS["loop"][2][0]: (_loop_inputs, _loop_step(_loop_fused)),
    PAIRS["trl"][0]: (_trl_inputs("geko"), _trl_step(_trl_fused)),
    PAIRS["trl"][1]: (_trl_inputs("plain"), _trl_step(_trl_plain)),
    PAIRS["trl"][2][0]: (_trl_inputs("trl"), _trl_step(_trl_fused)),
}
VARIANTS: dict[str, Callable] = {name: step for name, (_, step) in _RUNS.items()}


def inputs_of(name: str, dtype: torch.dtype) -> tuple:
    """The inputs of variant ``name`` (``bench_linear_logprobs.run_variant`` calls it in the child)."""
    return _RUNS[name][0](dtype)


def run() -> dict[str, dict[str, dict]]:
    from bench_linear_logprobs import run_variant

    names = [n for step in STEPS for n in (PAIRS[step][0], PAIRS[step][1], *PAIRS[step][2])]
    results: dict[str, dict[str, dict]] = {}
    for dtype in DTYPES:
        rounds = []
        for _ in range(REPEATS):
            one = {}
            for name in names:
                one[name] = r = run_variant(name, dtype, module="bench_rl_logprobs")
                print(f"  measured {dtype} {name}: {r['seconds']:.2f} s, peak RSS +{r['peak_mb'] or 0:.0f} MiB", flush=True)
            rounds.append(one)
        results[dtype] = {
            name: {
                "peak_mb": statistics.median(r[name]["peak_mb"] for r in rounds) if rounds[0][name]["peak_mb"] is not None else None,
                "seconds": statistics.median(r[name]["seconds"] for r in rounds),
                "rounds": [r[name]["seconds"] for r in rounds],
            }
            for name in names
        }
    return results


def report(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        f"CPU, one GRPO step (forward + backward), {ROWS} completions x {T} tokens, head [{VOCAB}, {DIM}], kept share "
        f"{KEEP:g}, {torch.get_num_threads()} threads, median of {REPEATS} round(s), each variant in a fresh process"
    ]
    for dtype, rows in results.items():
        lines.append(f"  {dtype}:")
        for name, r in rows.items():
            peak = "n/a" if r["peak_mb"] is None else f"+{r['peak_mb']:.0f} MiB"
            lines.append(f"    {name:46s} {r['seconds']:8.2f} s   peak RSS {peak}")
        for step in STEPS:
            fused, plain, others = PAIRS[step]
            for base in (plain, *others):
                a, b = rows[fused], rows[base]
                memory = "n/a" if a["peak_mb"] is None else f"{b['peak_mb'] / max(a['peak_mb'], 1.0):.2f}x less memory"
                lines.append(f"    {step}: fused against {base.split(': ', 1)[1]}: {memory}, {b['seconds'] / a['seconds']:.2f}x the speed")
    return "\n".join(lines)


def test_bench_rl_logprobs_cpu() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    results = run()
    print("\n" + report(results))
    for rows in results.values():
        for r in rows.values():
            assert r["seconds"] > 0


if __name__ == "__main__":
    print(report(run()), flush=True)
