"""gradlab: gradient diagnostics for MNIST multilayer perceptrons."""

from .startup import install_if_command

install_if_command()  # first, so that a Ctrl-C during the imports below is one line

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("gradlab")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"


def load(path, **kwargs):
    """Load a results folder into tidy frames; see ``gradlab.store.load``."""
    from .store import load as _load

    return _load(path, **kwargs)


def watch(model, optimizer, log_every=10, **kwargs):
    """Record a model's gradients around an unmodified training loop (``gradlab.watcher``)."""
    from .watcher import watch as _watch

    return _watch(model, optimizer, log_every, **kwargs)


def __getattr__(name):
    if name == "GradientRecorder":  # imported on first use: ``import gradlab`` stays light
        from .record import GradientRecorder

        return GradientRecorder
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")


__all__ = ["GradientRecorder", "__version__", "load", "watch"]
