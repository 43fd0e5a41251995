"""The base class of the errors that ``gradlab``'s commands show as one line (exit status 2)."""


class GradlabError(Exception):
    """Bad input or an unusable path, said in one line: what is wrong and what to give instead.

    Each subclass keeps a built-in base as well (``ValueError``, ``RuntimeError``), so that code
    catching those goes on working; the command line catches this class alone.
    """


class MissingExtra(GradlabError, ImportError):
    """An optional dependency is not installed: the message names it and the ``pip install
    'gradlab[EXTRA]'`` that brings it."""
