"""What :mod:`geko_core.integrations.hf` reads off a model: whether it is a causal language
model, its output layer (for the fused head) and a way to pass that layer through.

transformers is imported only inside :func:`is_causal_lm`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

__all__ = ["bound_argument", "is_causal_lm", "output_head", "passthrough"]

#: Model options that make the logits something other than ``lm_head(last hidden state)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The output layer of a causal LM whose logits are exactly ``lm_head(last hidden
    state)`` (LLaMA, Mistral, Qwen, GPT-2, GPT-NeoX, ... style), for ``geko_fused_head``.

    Raises:
        ValueError: no ``nn.Linear`` output layer, or a config that transforms the logits
            (soft-capping, a logit scale).
    """
    base = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    base = getattr(base, "_orig_mod", base)  # torch.compile
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"geko_fused_head needs a model whose output layer is an nn.Linear (get_output_embeddings()); "
            f"{type(base).__name__} has {type(head).__name__}"
        )
    config = getattr(base, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"geko_fused_head: {type(base).__name__} transforms its logits ({name}={value}), so they are not "
                "lm_head(hidden states); train without geko_fused_head"
            )
    return head


class passthrough:
    """Within the block, ``module(x)`` returns ``x`` (the module's parameters stay in place)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.forward = _identity  # an instance attribute shadows the class's forward

    def __exit__(self, *exc: Any) -> None:
        del self.module.forward


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A decoder-only language model (its labels are the inputs, shifted by one inside the loss)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    base = getattr(base, "_orig_mod", base)  # torch.compile
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def bound_argument(init: Callable[..., Any], args: tuple, kwargs: dict[str, Any], name: str) -> Any:
    """The value ``init(*args, **kwargs)`` would receive as ``name`` (None when it cannot tell)."""
    try:
        return inspect.signature(init).bind_partial(*args, **kwargs).arguments.get(name)
    except (TypeError, ValueError):  # the Trainer class raises its own error for bad arguments
        return None
