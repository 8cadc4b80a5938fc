"""The ``cmae`` group: version, verbosity, command registry, errors at the boundary."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any

import click

from catchment_mae.cli.demo import demo
from catchment_mae.cli.embed import embed
from catchment_mae.cli.embed_dir import embed_dir
from catchment_mae.cli.embed_zones import embed_zones
from catchment_mae.cli.eval import eval_cmd
from catchment_mae.cli.export import export
from catchment_mae.cli.info import info
from catchment_mae.cli.search import search
from catchment_mae.cli.serve import serve
from catchment_mae.cli.stats import stats
from catchment_mae.cli.synth import synth
from catchment_mae.cli.train import train
from catchment_mae.errors import CmaeError
from catchment_mae.logs import configure as configure_logging
from catchment_mae.version import __version__

log = logging.getLogger("catchment_mae")


class CmaeGroup(click.Group):
    """Library errors become one line on stderr and exit code 1; never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.UsageError):
            raise
        except click.ClickException as e:  # a command's own: the one-line form too
            raise _Failure(e.format_message(), e.exit_code) from e
        except CmaeError as e:
            code = getattr(e, "exit_code", 1)
            raise _Failure(str(e), code) from e
        except KeyboardInterrupt:
            raise _Failure("interrupted", 130) from None
        except ImportError as e:  # a base install running a torch command
            raise _Failure(
                f"this command needs {e.name or 'a missing package'}: install torch, "
                "then pip install 'catchment-mae[train]'",
                1,
            ) from e
        except Exception as e:  # the last line of defence: one line, details with -v
            if _while_interrupted(e):
                raise _Failure("interrupted", 130) from None
            if log.isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise _Failure(
                f"internal error: {type(e).__name__}: {first_line} (run with -v for "
                "details; please report it)",
                2,
            ) from e


def _while_interrupted(e: BaseException | None) -> bool:
    """Whether ``e`` was raised while a Ctrl-C (or SIGTERM) unwound the run: a
    lock released on the way out that the signal kept from being taken
    ("cannot release un-acquired lock") fails the unwinding, not the run."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__
    return False


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        if self.exit_code == 130 and os.environ.get("RANK", "0") != "0":
            return  # under torchrun, rank 0 alone says it was interrupted
        click.echo(f"cmae: error: {self.format_message()}", err=True)


@click.group(cls=CmaeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="cmae")
@click.option("-v", "--verbose", count=True, help="More output (repeat for more).")
@click.option("-q", "--quiet", count=True, help="Less output (repeat for less).")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """catchment-mae: scale-aware Masked Autoencoders for catchment rasters.

    Train on a directory of TIFFs, export the encoder to ONNX, embed archives.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = verbose - quiet
    configure_logging(verbose - quiet)


COMMANDS = (
    demo, embed, embed_dir, embed_zones, eval_cmd, export, info, search, serve,
    stats, synth, train,
)  # fmt: skip
for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    import signal

    from catchment_mae.interrupt import sigterm_raises

    signal.signal(signal.SIGTERM, sigterm_raises)  # python -m catchment_mae.cli.main
    cli(prog_name="cmae")


if __name__ == "__main__":
    main()
