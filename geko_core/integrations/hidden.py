"""Capture one layer's hidden states from a (Hugging Face) model with a forward hook.

GAIN-RL's angle concentration (``geko_core.angle_concentration``) is measured on the token
hidden states of a chosen layer. ``output_hidden_states=True`` would keep every layer's
``[B, T, d]`` tensor alive; a forward hook on the one layer keeps only that one::

    with capture_hidden_states(model, layer=-1) as capture:
        model(input_ids=ids, attention_mask=mask)
    stats = geko_core.angle_concentration(capture.hidden, mask, prefix_len=prompt_lengths)

transformers is never imported: any ``torch.nn.Module`` works, and the decoder layers are
found by the usual attribute paths of Hugging Face models (``model.layers``,
``transformer.h``, ``gpt_neox.layers``, ...) or, failing those, as the longest
``nn.ModuleList`` in the model.
"""

from __future__ import annotations

from types import TracebackType
from typing import Optional, Union

import torch
from torch import nn

__all__ = ["HiddenStateCapture", "capture_hidden_states", "find_decoder_layers"]

LayerSpec = Union[int, str, nn.Module]

# Where Hugging Face models keep their stack of decoder (or encoder) blocks, most common first.
_LAYER_PATHS = (
    "model.layers",  # LLaMA, Mistral, Qwen, Gemma, Phi-3, ... (*ForCausalLM)
    "layers",  # the same bare models (LlamaModel, ...)
    "model.language_model.layers",  # multimodal wrappers
    "model.decoder.layers",  # OPT, BART-style decoders
    "decoder.layers",
    "transformer.h",  # GPT-2, GPT-J, GPT-Neo, Falcon, BLOOM
    "h",
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
    "transformer.blocks",  # MPT
    "encoder.layer",  # BERT-style encoders
)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks.

    Tries the usual Hugging Face attribute paths, then falls back to the longest
    ``nn.ModuleList`` in the model (which also finds the blocks inside wrappers such as PEFT).

    Raises:
        ValueError: the model holds no ``nn.ModuleList``.
    """
    for path in _LAYER_PATHS:
        try:
            candidate = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: none of {', '.join(_LAYER_PATHS)} "
            "exists and it holds no nn.ModuleList; pass the layer as a module or a dotted module name"
        )
    return max(lists, key=len)  # ties: the first in module order


def _resolve_layer(model: nn.Module, layer: LayerSpec) -> tuple[nn.Module, str]:
    """(module, description) of the requested layer."""
    if isinstance(layer, bool):
        raise TypeError("layer must be an int index, a dotted module name or an nn.Module, got bool")
    if isinstance(layer, int):
        layers = find_decoder_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise IndexError(f"layer {layer} is out of range for a model with {len(layers)} decoder layers")
        return layers[layer], f"decoder layer {layer % len(layers)} of {len(layers)}"
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError as exc:
            raise ValueError(f"{type(model).__name__} has no submodule {layer!r} ({exc})") from None
        return module, repr(layer)
    if isinstance(layer, nn.Module):
        if not any(module is layer for module in model.modules()):
            raise ValueError(f"the {type(layer).__name__} passed as layer is not a submodule of {type(model).__name__}")
        return layer, type(layer).__name__
    raise TypeError(f"layer must be an int index, a dotted module name or an nn.Module, got {type(layer).__name__}")


def _hidden_from_output(output: object, where: str) -> torch.Tensor:
    """The ``[B, T, d]`` hidden states in a layer's output: the tensor itself, the first
    element of a tuple (older transformers decoder layers return ``(hidden, ...)``), or the
    ``last_hidden_state`` of a model output."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the output of {where} is a {type(output).__name__}, not a hidden-state tensor")
    if output.dim() != 3:
        raise ValueError(f"the output of {where} has shape {tuple(output.shape)}, expected [B, T, d]")
    return output


class HiddenStateCapture:
    """Records a layer's output hidden states on every forward pass while active.

    Use it as a context manager (``with capture_hidden_states(model, layer) as capture:``);
    the hook is removed on exit, also when the block raises. Captured tensors are detached
    (no autograd graph is kept) but not copied: they live on the model's device and dtype.

    Attributes:
        module: the hooked module.
        captured: the captured ``[B, T, d]`` tensors in call order (only the latest one
            unless ``keep_all=True``).
    """

    def __init__(self, model: nn.Module, layer: LayerSpec = -1, *, keep_all: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.module, self._where = _resolve_layer(model, layer)
        self.keep_all = bool(keep_all)
        self.captured: list[torch.Tensor] = []
        self._handle: Optional[torch.utils.hooks.RemovableHandle] = None

    def _hook(self, module: nn.Module, args: tuple, output: object) -> None:
        hidden = _hidden_from_output(output, self._where).detach()
        if self.keep_all:
            self.captured.append(hidden)
        else:
            self.captured[:] = [hidden]

    @property
    def active(self) -> bool:
        """The hook is registered."""
        return self._handle is not None

    @property
    def hidden(self) -> torch.Tensor:
        """The latest captured ``[B, T, d]`` hidden states.

        Raises:
            RuntimeError: no forward pass ran through the layer while capturing.
        """
        if not self.captured:
            raise RuntimeError(f"no hidden states captured from {self._where}: run a forward pass inside the capture")
        return self.captured[-1]

    def start(self) -> HiddenStateCapture:
        """Register the hook (what entering the context does)."""
        if self._handle is not None:
            raise RuntimeError("this capture is already active")
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        """Remove the hook (what leaving the context does); the captures stay readable."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> HiddenStateCapture:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.remove()


def capture_hidden_states(model: nn.Module, layer: LayerSpec = -1, *, keep_all: bool = False) -> HiddenStateCapture:
    """A context manager recording the output hidden states of one layer of ``model``.

    Args:
        model: any ``torch.nn.Module``, typically a Hugging Face ``*ForCausalLM`` or base model.
        layer: an int index into the model's decoder layers (negative counts from the end;
            found by ``find_decoder_layers``), a dotted module name (``"model.layers.3"``), or
            the module itself. The output of decoder layer ``i`` is what
            ``output_hidden_states=True`` reports as ``hidden_states[i + 1]``, except for the
            last layer, whose reported value has the final norm applied and the hooked one not.
        keep_all: keep the hidden states of every forward pass (e.g. each step of
            ``generate``), not only the latest.

    Returns:
        A ``HiddenStateCapture``; ``capture.hidden`` is the latest ``[B, T, d]`` tensor.

    Raises:
        TypeError: ``model`` is not a module, ``layer`` has an unsupported type.
        IndexError: the int index is out of range.
        ValueError: no such submodule, a module outside ``model``, or no decoder layers found.
    """
    return HiddenStateCapture(model, layer, keep_all=keep_all)
