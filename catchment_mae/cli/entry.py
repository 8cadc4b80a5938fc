"""The ``cmae`` script's entry: a Ctrl-C or SIGTERM while the commands are
imported (a few tenths of a second) ends with the one-line message, not a
traceback nor a silent death by the signal."""

from __future__ import annotations

import signal
import sys

from catchment_mae.interrupt import sigterm_raises


def main() -> None:
    signal.signal(signal.SIGTERM, sigterm_raises)
    try:
        from catchment_mae.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("cmae: error: interrupted\n")
        sys.exit(130)
    run()
