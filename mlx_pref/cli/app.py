"""The ``mlx-pref`` command group and its entry point: user errors are one line on stderr
and exit status 2, never a traceback."""

from __future__ import annotations

import sys

import click

import mlx_pref  # noqa: F401  (loads the fast BLAS before mlx.core)
from mlx_pref.errors import Interrupted, MlxPrefError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mlx_pref.__version__, prog_name="mlx-pref")
def cli() -> None:
    """Preference optimization (DPO, IPO, SimPO, ORPO, BCO, KTO, ...) for language models on MLX."""


def main() -> None:
    """Entry point: user errors are one line on stderr and exit status 2, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # unknown flag, bad value: one line, with the help hint
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except MlxPrefError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code if isinstance(exc, Interrupted) else 2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without a checkpoint
        click.echo("aborted", err=True)
        sys.exit(130)
    except OSError as exc:  # the disk or the file system refused: name the file, nothing else
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(2)
