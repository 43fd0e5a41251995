"""``python -m gradlab``: the same as the ``gradlab`` command."""

from .cli import main

main()
