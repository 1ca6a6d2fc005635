"""Capture intermediate feature maps by dotted module name with scoped forward hooks."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from deltaft._probe import output_map
from deltaft.layers import resolve_layers

__all__ = ["FeatureExtractor", "StopForward"]


class StopForward(Exception):
    """Raised by a :class:`FeatureExtractor` hook to skip the rest of a forward pass."""


class FeatureExtractor:
    """Context manager that records the outputs of named modules.

    Hooks are registered on ``__enter__`` and removed on ``__exit__``. After a forward pass,
    :meth:`pop` returns ``{name: output}`` and clears the store, so maps never leak from one
    step into the next.

    Args:
        model: the network to observe.
        layers: dotted module names (as in ``model.named_modules()``), or a single name.
        stop_after_last: raise :class:`StopForward` once every layer has produced its output,
            so a network used only for its feature maps runs no further than it must. Wrap the
            forward in :meth:`run` to swallow the exception.

    A module that returns a tuple (Hugging Face transformers 4 blocks return
    ``(hidden_states, ...)``) is recorded by its first element, the map.

    A module must run once per forward: a second call before :meth:`pop` raises, because two
    calls give two different maps and which one is meant cannot be told (ResNet blocks call
    their one ``relu`` module two or three times).

    Raises:
        ValueError: a name is not a module of ``model`` (the message lists close matches), or
            ``layers`` is empty or repeats a name; during a forward, a module that runs a
            second time before :meth:`pop`.

    Example:
        >>> import torch, torchvision
        >>> net = torchvision.models.resnet18(num_classes=3)
        >>> with FeatureExtractor(net, ["layer1", "layer4"]) as fx:
        ...     _ = net(torch.randn(1, 3, 64, 64))
        ...     maps = fx.pop()
        >>> {k: tuple(v.shape) for k, v in maps.items()}
        {'layer1': (1, 64, 16, 16), 'layer4': (1, 512, 2, 2)}
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str], *, stop_after_last: bool = False
    ) -> None:
        self.model = model
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.modules = resolve_layers(model, self.layers)
        self.stop_after_last = stop_after_last
        self._store: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            found = output_map(output)  # a tensor, or a tuple's first (HF transformers 4 blocks)
            if found is None:
                raise TypeError(
                    f"Layer {name!r} returned {type(output).__name__}, expected a Tensor; "
                    "choose a module whose output is a (B, C, H, W), (B, H, W, C) or (B, N, C) "
                    "feature map."
                )
            if name in self._store:
                # A shared module (ResNet's block ``relu``): the source, stopped early, would keep
                # one call and the target another, and two different maps would be compared.
                raise ValueError(
                    f"Layer {name!r} runs more than once per forward (or a forward ran twice "
                    "before pop()), so its map is ambiguous. Choose a module that is called "
                    "once, such as a convolution or a whole block."
                )
            self._store[name] = found
            if self.stop_after_last and len(self._store) == len(self.layers):
                raise StopForward

        return hook

    def __enter__(self) -> FeatureExtractor:
        if self._handles:
            raise RuntimeError("FeatureExtractor is already active; it is not re-entrant.")
        self._store.clear()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model, returning its output or ``None`` if it stopped after the last layer."""
        try:
            return self.model(*args, **kwargs)
        except StopForward:
            return None

    def pop(self) -> dict[str, Tensor]:
        """Return the captured maps keyed by layer name, in ``layers`` order, and clear them.

        Raises:
            RuntimeError: some layer did not run in the last forward pass.
        """
        missing = [n for n in self.layers if n not in self._store]
        if missing:
            raise RuntimeError(
                f"Layers {missing} produced no output; did the forward pass run inside the "
                "`with FeatureExtractor(...)` block, and do those modules run in forward()?"
            )
        out = {n: self._store[n] for n in self.layers}
        self._store.clear()
        return out
