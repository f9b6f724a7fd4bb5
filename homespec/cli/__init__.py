"""The Typer command line: one module per command, joined in ``main.py``. Only this layer (and ``server/``)
catches ``HomespecError``: it prints a one-line error and a hint on stderr and exits with the error's code."""
