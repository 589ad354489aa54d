"""The per-token log-probabilities of :class:`~geko_core.integrations.trl_grpo.GekoGRPOTrainer`:
TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, what GRPOTrainer calls with
``fused_lm_head=True``) with :func:`geko_core.linear_logprobs` in place of TRL's chunked head
function. What is replaced and what keeps TRL's path: ``trl_grpo``'s module documentation,
"Log-probabilities".
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

from ..linear_logprobs import linear_logprobs

__all__ = ["use_linear_logprobs"]

#: Config attributes that change the head's logits (TRL's fused path applies them; ``linear_logprobs``
#: does not): a model that sets any of them keeps TRL's own path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _trl_path_reason(model: Any) -> str | None:
    """Why ``model`` keeps TRL's fused head (None: ``linear_logprobs`` can replace it)."""
    if "forward" not in vars(model):
        return "TRL did not give the model a fused head"
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        return "a multimodal model (its language backbone is found by TRL)"
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            return f"the config sets {name}={value!r}"
    if getattr(text_config, "output_router_logits", False):
        return "a mixture-of-experts model whose load-balancing loss TRL's fused forward adds"
    return None


def _sharded(*params: torch.Tensor | None) -> bool:
    """A head parameter that is an FSDP2 shard or a DeepSpeed ZeRO-3 partition: TRL's path
    gathers it (in the backward too), ours cannot."""
    return any(p is not None and (type(p).__name__ == "DTensor" or hasattr(p, "ds_status")) for p in params)


def use_linear_logprobs(model: Any, temperature: float, fp32_head: bool, *, entropy: bool) -> str:
    """Make ``model(..., labels=..., fused_lm_head=True)`` compute its per-token log-probabilities
    (and entropy) with ``linear_logprobs`` from the backbone's last hidden states and the output
    embeddings at ``temperature``, in place of TRL's chunked function. Returns the path taken:
    ``"linear_logprobs"`` or ``"trl: <why>"`` (the model is then left as TRL patched it)."""
    reason = _trl_path_reason(model)
    if reason is not None:
        return f"trl: {reason}"
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward  # TRL's fused forward, which calls the model's own when not fused

    @functools.wraps(type(model).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if not fused_lm_head or kwargs.get("output_router_logits") or _sharded(weight, bias):
            return trl_forward(
                *args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch, **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t + 1
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        mask = targets != -100
        device = hidden.device.type
        # The head's matmul in TRL's dtype: fp32 with cast_lm_head_to_fp32, else autocast's, else the hidden states'.
        if fp32_head:
            dtype = torch.float32
        elif torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = hidden.dtype
        with torch.autocast(device, enabled=False):
            log_probs, entropies = linear_logprobs(
                hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
                temperature=temperature, entropy=entropy, mask=mask,
            )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropies, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return "linear_logprobs"
