"""The reader pool: a dead or stuck worker fails only its own task."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import tifffile

from catchment_mae.workers import ReaderDied, ReaderPool, TaskFailed, failure_reason
from tests.conftest import python_out


def square(x: int) -> int:
    return x * x


def pid() -> int:
    return os.getpid()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def fail() -> None:
    raise ValueError("bad value\nsecond line")


def hang(started: str) -> None:
    """Says it runs (a file), then sleeps until its worker is stopped."""
    open(started, "w").close()
    time.sleep(600)


def wait_for(path: str) -> None:
    """A worker's start-up that lasts until the test says (a file appears)."""
    for _ in range(60_000):
        if os.path.exists(path):
            return
        time.sleep(0.001)


class Clock:
    """The pool's clock, moved by the test alone: budgets pass when it says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _until(condition, what: str) -> None:
    for _ in range(30_000):
        if condition():
            return
        time.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def test_pool__answers_in_workers_and_inline():
    with ReaderPool(2) as pool:
        futures = [pool.submit(square, i) for i in range(20)]
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(20)]
        assert pool.submit(pid).result(timeout=30) != os.getpid()
    inline = ReaderPool(0)
    assert inline.submit(square, 3).result() == 9
    assert inline.submit(pid).result() == os.getpid()


def test_pool__a_task_that_kills_its_worker_fails_alone():
    with ReaderPool(2) as pool:
        before = pool.submit(square, 2)
        dead = pool.submit(die)
        after = [pool.submit(square, i) for i in range(10)]
        with pytest.raises(ReaderDied) as err:
            dead.result(timeout=30)
        assert err.value.exitcode == -signal.SIGKILL
        assert failure_reason(err.value) == (
            "the reader process died while reading it (signal SIGKILL)"
        )
        assert before.result(timeout=30) == 4
        assert [f.result(timeout=30) for f in after] == [i * i for i in range(10)]


def test_pool__an_idle_worker_killed_is_replaced():
    with ReaderPool(2) as pool:
        pids = {pool.submit(pid).result(timeout=30) for _ in range(8)}
        for p in pids:
            os.kill(p, signal.SIGKILL)  # no task running anywhere
        time.sleep(0.3)
        got = [pool.submit(square, i) for i in range(6)]
        assert [f.result(timeout=30) for f in got] == [i * i for i in range(6)]
        assert not pids & {pool.submit(pid).result(timeout=30) for _ in range(4)}


def test_pool__a_task_past_its_budget_is_stopped_and_the_rest_go_on(tmp_path):
    clock, started = Clock(), tmp_path / "started"
    with ReaderPool(2, timeout=0.5, clock=clock) as pool:
        stuck = pool.submit(hang, str(started))
        _until(started.exists, "the stuck task started")
        quick = [pool.submit(sleep, 0.01) for _ in range(4)]
        # The other worker runs the rest; one may wait in the stuck one's pipe.
        _until(lambda: sum(f.done() for f in quick) >= 3, "the rest ran")
        assert not stuck.done()  # its budget has not passed on the pool's clock
        clock.now += 0.6
        pool.submit(square, 1)  # wakes the pool, which looks at the time again
        with pytest.raises(TimeoutError):
            stuck.result(timeout=60)
        assert [f.result(timeout=60) for f in quick] == ["woke"] * 4
        assert failure_reason(TimeoutError(), 0.5) == (
            "timed out after 0.5 s (the reader was stopped)"
        )


def test_pool__a_task_s_budget_starts_when_its_worker_is_up(tmp_path):
    """Tasks go to each worker as soon as it is started, and their time budget
    runs from when it is up: a slow start is not the task's time."""
    clock, go = Clock(), tmp_path / "go"
    with ReaderPool(
        2, initializer=wait_for, initargs=(str(go),), timeout=0.5, clock=clock
    ) as pool:
        futures = [pool.submit(square, i) for i in range(4)]
        clock.now += 10.0  # the workers take "10 s" to start
        pool.submit(square, 0)  # the pool looks at the time while they start
        go.touch()
        assert [f.result(timeout=60) for f in futures] == [0, 1, 4, 9]


def test_prestart__the_forkserver_starts_at_once_deaf_to_ctrl_c():
    """cmae embed-dir starts the readers' forkserver before its own imports,
    with SIGINT ignored: a Ctrl-C to the terminal's process group while it
    imports PRELOAD (about half a second) printed its KeyboardInterrupt
    traceback above cmae's one-line message, and killed it."""
    code = (
        "import os, signal\n"
        "import multiprocessing.forkserver as fs\n"
        "from catchment_mae.workers import ReaderPool, prestart\n"
        "prestart()\n"
        "os.kill(fs._forkserver._forkserver_pid, signal.SIGINT)\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "with ReaderPool(1) as pool:\n"
        "    print(pool.submit(os.getpid).result(timeout=30) != os.getpid())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True"], r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr


def test_entry__ctrl_c_while_the_commands_import_is_one_line(monkeypatch, capsys):
    import builtins

    from catchment_mae.cli import entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "catchment_mae.cli.main":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 130
    assert capsys.readouterr().err == "cmae: error: interrupted\n"


def test_entry__sigterm_while_the_commands_import_is_one_line():
    """SIGTERM in the first second (the commands' imports; torch's in train)
    ended the process by the signal: exit 143 and not a word."""
    code = (
        "import builtins, os, signal, sys\n"
        "real = builtins.__import__\n"
        "def signalled(name, *args, **kwargs):\n"
        "    if name == 'catchment_mae.cli.main':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = signalled\n"
        "from catchment_mae.cli.entry import main\n"
        "sys.argv = ['cmae', '--help']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 130 and r.stderr == "cmae: error: interrupted\n", r


def modules_a_read_imports(root: str, rels: list[str]) -> list[str]:
    """The modules a reader process imports to read ``rels`` (all of them read)."""
    import sys

    from catchment_mae.batch.reader import read_one
    from catchment_mae.spec import PreprocessSpec

    before = set(sys.modules)
    spec = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster")
    assert all(read_one(root, rel, spec)[1] is not None for rel in rels)
    return sorted(set(sys.modules) - before)


def test_pool__a_reader_s_first_rasters_import_nothing(dem_dir):
    """The forkserver preloads tifffile's GeoTIFF tables and the usual codecs, so
    a new reader's first DEFLATE and LZW GeoTIFFs import no module (those imports
    took about 80 ms of a reader's first raster). A fresh interpreter: the
    forkserver is the one cmae starts, whatever ran before in this one."""
    rels = sorted(p.name for p in dem_dir.glob("*.tif"))[:2]
    kinds = set()
    for rel in rels:
        with tifffile.TiffFile(dem_dir / rel) as tif:
            kinds.add(tif.pages[0].compression.name)
    assert kinds == {"DEFLATE", "LZW"}
    code = (
        "from catchment_mae.workers import ReaderPool\n"
        "from tests.test_workers import modules_a_read_imports\n"
        "with ReaderPool(1) as pool:\n"
        f"    f = pool.submit(modules_a_read_imports, {str(dem_dir)!r}, {rels!r})\n"
        "    print(f.result(timeout=60))\n"
    )
    assert python_out(code) == "[]"


def test_pool__readers_do_not_run_the_caller_s_script_again(tmp_path):
    """A script that uses the pool at its top level, with no ``if __name__ ==
    "__main__"`` (as the README's ``catchment_mae.train({...})`` saved to a
    file): Python's forkserver would run it again in each reader, which would
    start readers of its own during its start and die."""
    script = tmp_path / "use_pool.py"
    script.write_text(
        "import os\n"
        "from catchment_mae.workers import ReaderPool\n"
        f"with open({str(tmp_path / 'runs')!r}, 'a') as f:\n"
        "    print(os.getpid(), file=f)\n"
        "with ReaderPool(2) as pool:\n"
        "    pids = {pool.submit(os.getpid).result(timeout=60) for _ in range(6)}\n"
        "print(os.getpid() not in pids)\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
    assert len((tmp_path / "runs").read_text().splitlines()) == 1  # run once


def test_pool__a_function_of_the_running_script_is_refused_at_once(tmp_path):
    script = tmp_path / "own_function.py"
    script.write_text(
        "from catchment_mae.workers import ReaderPool\n"
        "def f():\n"
        "    return 1\n"
        "if __name__ == '__main__':\n"
        "    with ReaderPool(1) as pool:\n"
        "        try:\n"
        "            pool.submit(f)\n"
        "        except ValueError as e:\n"
        "            print(e)\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("f is defined in the running script")


def test_pool__an_exception_is_a_one_line_reason():
    with ReaderPool(1) as pool:
        with pytest.raises(TaskFailed) as err:
            pool.submit(fail).result(timeout=30)
    assert failure_reason(err.value) == "ValueError: bad value"
    with pytest.raises(ValueError):
        ReaderPool(0).submit(fail).result()


def test_pool__closing_with_kill_does_not_wait_for_busy_workers():
    pool = ReaderPool(2)
    busy = [pool.submit(sleep, 60) for _ in range(3)]
    time.sleep(0.5)  # the workers start on them
    t0 = time.monotonic()
    pool.close(kill=True)
    assert time.monotonic() - t0 < 5
    assert all(f.done() for f in busy)
    with pytest.raises(Exception, match="reader processes stopped"):
        pool.submit(square, 1)
