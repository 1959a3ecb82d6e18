"""SLM Lab spec files: reading them (``load.py``) and importing them as our configs
(``importer.py``: :func:`import_spec` -> :class:`SpecImport` with an :class:`ImportReport`;
``command.py``: ``slm-lab import``)."""
