"""Callbacks that record a framework's fit with ``gradlab.watch`` and save it as a run:
``gradlab.integrations.lightning`` (extra ``gradlab[lightning]``) and
``gradlab.integrations.transformers`` (extra ``gradlab[transformers]``, the Hugging Face
``Trainer``). Each module imports its framework when it is imported itself, never before:
``import gradlab`` needs neither."""
