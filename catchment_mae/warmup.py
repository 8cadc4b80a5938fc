"""pyarrow warmed up beside other start-up work (embed-dir's and training's
first pass write Arrow tables from their first rows)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def warming_up() -> Iterator[None]:
    """pyarrow's first ``pa.array`` run in a thread during the block (joined at
    its end).

    pyarrow imports pandas, when it is installed, at its first ``pa.array``,
    which stalled the first part's flush while the readers waited (a third of
    the main process's CPU in a 1,000-file run of a negligible model). Started
    beside the readers' start, it is done before the first row arrives."""
    import pyarrow as pa

    thread = threading.Thread(
        target=pa.array, args=([0],), daemon=True, name="cmae-warm-up"
    )
    thread.start()
    try:
        yield
    finally:
        thread.join()
