"""GekoSFTTrainer as a user runs it: a training step reads nothing back from the device, every
DDP rank logs the run's figures, and the README's snippet runs as written. The tiny model, data
and tokenizer are those of tests/test_trl.py."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("trl")
pytest.importorskip("datasets")

import geko_core.integrations  # noqa: E402
from geko_core.integrations.trl import GekoSFTTrainer  # noqa: E402
from test_trl import make_args, make_pairs, quiet_and_one_thread, tiny_llama, tokenizer  # noqa: E402,F401 (fixtures)


# -- host synchronisation --------------------------------------------------------------------------
_INTEGRATIONS = os.path.dirname(geko_core.integrations.__file__)
# What reads a device tensor back to the host (on a GPU each waits for the queued work).
_SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__")


class HostReads:
    """Counts the calls of tensor methods that read values back to the host, made by the
    integration's own code while ``active``. On a CPU box every tensor is a host tensor, so
    the calls are counted, not timed."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, int]] = []
        self.active = False
        for name in _SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, method):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if self.active and caller.f_code.co_filename.startswith(_INTEGRATIONS):
                self.calls.append((name, caller.f_code.co_name, caller.f_lineno))
            return method(tensor, *args, **kwargs)

        return counted


class CountingSFTTrainer(GekoSFTTrainer):
    host_reads: HostReads

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.host_reads.active = model.training
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self.host_reads.active = False


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, tokenizer, monkeypatch, packing):
    """The loss, the Selector's weights and statistics and SFTTrainer's metrics of a step
    read no tensor back to the host (no .item(), .cpu(), tensor truth value, ...): the
    metrics are read when the Trainer logs."""
    args = make_args(tmp_path, num_train_epochs=2, logging_steps=3, packing=packing)
    trainer = CountingSFTTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=make_pairs(24), processing_class=tokenizer)
    trainer.host_reads = HostReads(monkeypatch)
    trainer.train()
    assert trainer.host_reads.calls == []
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(0 < h["entropy"] < math.log(len(tokenizer)) for h in logs)


# -- DDP through torch.distributed.run ----------------------------------------------------------------
_DDP_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_trl import ObservedStats, make_args, make_pairs, tiny_llama, CHARS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from geko_core.integrations.trl import GekoSFTTrainer

torch.set_num_threads(1)
vocab = {{"<pad>": 0, "</s>": 1, "<unk>": 2, **{{c: 3 + i for i, c in enumerate(CHARS)}}}}
model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
model.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
out = Path({out!r})
args = make_args(out, "ddp", num_train_epochs=2, per_device_train_batch_size=4, logging_steps=1, packing=True,
                 ddp_backend="gloo", ddp_find_unused_parameters=False)
trainer = GekoSFTTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=make_pairs(30), processing_class=tokenizer)
observed = ObservedStats(trainer.selector)
trainer.train()
sel = trainer.selector
_, last = observed.batches[-1]
json.dump({{
    "logged": [{{k: v for k, v in h.items() if "seconds" not in k}} for h in trainer.state.log_history if "loss" in h],
    "local_tokens": sel.metrics()["backpropagated_tokens"], "progress": sel.epoch_progress(),
    "sample_tokens": int(sel.context.sample_tokens.sum()),
    "last_valid": float(last.valid_tokens.sum()), "last_entropy": float((last.entropy.double() * last.valid_tokens).sum()),
}}, open(out / f"rank{{os.environ['RANK']}}.json", "w"))
"""


@pytest.mark.slow  # about 80 s: two processes import TRL and train
def test_ddp_logs_the_runs_figures(tmp_path):
    """Two gloo processes: every rank logs the same SFT metrics (token means over both ranks'
    tokens) and the run's saved token fraction, not its own."""
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["logged"] == ranks[1]["logged"] and len(ranks[0]["logged"]) == 8  # 2 epochs of 4 steps
    last = ranks[0]["logged"][-1]
    assert ranks[0]["local_tokens"] != ranks[1]["local_tokens"]
    assert last["geko/backpropagated_tokens"] == ranks[0]["local_tokens"] + ranks[1]["local_tokens"]
    expected = 1 - last["geko/backpropagated_tokens"] / (ranks[0]["progress"] * ranks[0]["sample_tokens"])
    assert last["geko/saved_token_fraction"] == pytest.approx(expected)
    # The last log covers one micro-batch: its entropy is the token mean over both ranks.
    entropy = sum(r["last_entropy"] for r in ranks) / sum(r["last_valid"] for r in ranks)
    assert last["entropy"] == pytest.approx(entropy, rel=1e-6)


# -- the README's snippet ---------------------------------------------------------------------------
def _readme_snippet() -> str:
    """The README's TRL snippet: its python block that builds a GekoSFTTrainer."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    return next(b for b in blocks if "GekoSFTTrainer(" in b)


# TRL 1.16's SFTConfig sets gradient_checkpointing=True, a name transformers 5.25 deprecates.
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_readme_snippet_runs(tmp_path, tokenizer, monkeypatch, capsys):
    """The TRL snippet the README shows, as it is, on the tiny model and pairs."""
    snippet = _readme_snippet()
    assert len(snippet.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_llama(len(tokenizer)), "dataset": make_pairs(24), "tokenizer": tokenizer}
    code = snippet
    if not torch.cuda.is_available():  # SFTConfig's default bf16=True asks for a GPU unless told to use the CPU
        code = code.replace("packing=True)", "packing=True, use_cpu=True)")
    exec(compile(code, "README", "exec"), namespace)
    trainer = namespace["trainer"]
    assert len(trainer.selector.history) == 3 and (tmp_path / "out").is_dir()
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(trainer.selector.metrics()["saved_token_fraction"])
