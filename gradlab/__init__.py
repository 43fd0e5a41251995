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


__all__ = ["__version__", "load"]
