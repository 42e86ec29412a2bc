"""The ``mlx-pref`` command line: thin commands that parse, build a Config and call the
library. ``app.py`` holds the group and the entry point; one module per family of
commands registers on it."""

from mlx_pref.cli import data, evaluate, export, generate, tools, train
from mlx_pref.cli.app import cli, main

__all__ = ["cli", "data", "evaluate", "export", "generate", "main", "tools", "train"]
