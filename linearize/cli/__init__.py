"""The ``linearize`` command line: the verbs (``main.py``, entry point ``linearize.cli.main:main``), their flags
generated from the settings classes (``options.py``) and the recipe verbs ``finetune`` / ``validate``
(``recipe_commands.py``). Verbs parse options, check what needs no weights and call a pipeline; nothing below imports
this package."""
