"""The ``cmae`` script's entry: a Ctrl-C while the commands are imported (a
few tenths of a second) ends with the one-line message, not a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from catchment_mae.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("cmae: error: interrupted\n")
        sys.exit(130)
    run()
