"""One hook lifecycle for every recorder: registered together, removed together.

Like fastai's ``Hook``/``Hooks``: a ``Hooks`` holds how to register each hook (a module's
forward hook, an optimizer's step hook, ...) and the handles while they are registered, so a
recorder can register its hooks only for the steps it records and always remove them on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn
from torch.utils.hooks import RemovableHandle

Register = Callable[[], RemovableHandle]


class Hooks:
    """Hooks registered and removed as one (``on()``, ``off()``; a context manager that
    removes them on exit)."""

    def __init__(self, registrations: Iterable[Register]):
        self._registrations = list(registrations)
        self._handles: list[RemovableHandle] = []

    @classmethod
    def forward(cls, modules: Iterable[nn.Module], hooks: Iterable[Callable]) -> Hooks:
        """Each module's forward hook (``hook(module, inputs, output)``)."""
        return cls([lambda m=m, h=h: m.register_forward_hook(h)
                    for m, h in zip(modules, hooks, strict=True)])

    @property
    def registered(self) -> bool:
        return bool(self._handles)

    def set(self, on: bool) -> None:
        """Register every hook (if not yet) or remove them (if registered)."""
        if on and not self._handles:
            self._handles = [register() for register in self._registrations]
        elif not on and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def on(self) -> None:
        self.set(True)

    def off(self) -> None:
        self.set(False)

    def __enter__(self) -> Hooks:
        self.on()
        return self

    def __exit__(self, *exc) -> None:
        self.off()
