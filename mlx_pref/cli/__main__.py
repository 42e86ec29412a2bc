"""``python -m mlx_pref.cli``: the same as the ``mlx-pref`` command."""

from mlx_pref.cli import main

main()
