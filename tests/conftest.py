"""Shared fixtures: generated TIFFs, the real files in shared/, tiny models, the CLI."""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from catchment_mae.synth import DemSpec, generate_dems, write_dem

# Tests never write into the user's cache: one decode-once cache for the session
# (CLI subprocesses inherit it), removed at exit. Worker processes that import
# this module keep the session's: they leave by os._exit, skipping atexit, and
# left 60-odd empty folders in /tmp per run when each made its own.
_CACHE_PREFIX = "cmae-test-cache-"
if not Path(os.environ.get("CMAE_CACHE_DIR", "")).name.startswith(_CACHE_PREFIX):
    os.environ["CMAE_CACHE_DIR"] = tempfile.mkdtemp(prefix=_CACHE_PREFIX)
    atexit.register(shutil.rmtree, os.environ["CMAE_CACHE_DIR"], ignore_errors=True)

# A run started in the background of a non-interactive shell (`cmd &`) inherits
# SIGINT ignored, and so would every command a test starts: a Ctrl-C test would
# then signal processes that cannot hear it (four such tests failed that way,
# and a `cmae train` left running slowed the rest). The tests start commands as
# a terminal would: SIGINT at its default (each Python then raises
# KeyboardInterrupt). Only where it was ignored: pytest's own handler stays.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
# Small real rasters and the original tool's examples, committed (tests/data/README.md).
DATA = REPO / "tests" / "data"
# The optional extended corpus: 50 real files beside the repository (CI has it).
SHARED = Path(os.environ.get("CMAE_SHARED_DIR", REPO.parent / "shared"))
REAL_DIR = SHARED / "data" / "real"

# A ViT small enough that a training step takes milliseconds on the CPU.
TINY = dict(
    vit_model_name="vit_tiny_patch16_224",
    image_size=32,
    patch_size=8,
    embed_dim=32,
    depth=1,
    num_heads=2,
    decoder_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    scale_hidden_dim=16,
    batch_size=4,
    num_workers=0,
    lr=1e-3,
    warmup_epochs=1.0,
    device="cpu",
)


def real_manifest() -> list[Any]:
    """Rows of the extended corpus's MANIFEST.tsv as test parameters, or one
    parameter that skips, saying why, where the corpus is absent (a clone)."""
    path = REAL_DIR / "MANIFEST.tsv"
    if not path.exists():
        reason = (
            f"the extended corpus is not here ({path}): it lies beside the "
            "repository in CI; set CMAE_SHARED_DIR to run these"
        )
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="absent")]
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The committed real rasters (tests/data)."""
    return DATA


@pytest.fixture
def runner() -> CliRunner:
    """rasterio's runner fixture; Click >= 8.2 keeps stderr apart."""
    return CliRunner()


# `cmae` run as `python -c NO_TORCH ARGS...`, with `import torch` (and timm,
# lightly) failing, as in a base install without torch.
NO_TORCH = (
    "import sys; sys.modules.update(torch=None, timm=None, lightly=None); "
    "from catchment_mae.cli.main import main; "
    "sys.argv = ['cmae'] + sys.argv[1:]; main()"
)


def start_cmae(*args: Any, entry: str | None = None, **kw: Any) -> subprocess.Popen:
    """``cmae ARGS`` started in the background, text pipes for stdout and
    stderr (``kw`` overrides them); ``entry``: run as ``python -c entry`` (e.g.
    NO_TORCH) instead of ``python -m catchment_mae.cli.main``."""
    head = ["-c", entry] if entry is not None else ["-m", "catchment_mae.cli.main"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen([sys.executable, *head, *map(str, args)], **{**pipes, **kw})


def wait_for(proc: subprocess.Popen, ready: Any, seconds: float, what: str) -> None:
    """Waits until ``ready()`` while ``proc`` runs; fails the test, with what the
    process said, when it ends first or ``seconds`` pass (a generous bound: the
    event is what is waited for, not a time)."""
    import time

    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{what} never came: {proc.returncode}, {err or out}")
        time.sleep(0.005)


def python_out(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter (its imports are its own);
    it must succeed."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def write_tiff(path: Path, data: np.ndarray, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, data, **kwargs)
    return path


@pytest.fixture
def make_tiff(tmp_path: Path):
    """Writes a TIFF under tmp_path with tifffile: ``make_tiff(name, data, **kw)``."""

    def make(name: str, data: np.ndarray, **kwargs: Any) -> Path:
        return write_tiff(tmp_path / name, data, **kwargs)

    return make


def dem_spec(
    height: int = 40, width: int = 56, pixel: float = 30.0, seed: int = 0, **kw: Any
) -> DemSpec:
    base = dict(
        height=height,
        width=width,
        pixel_size=pixel,
        epsg=32633,
        origin=(500_000.0, 5_000_000.0),
        dtype="float32",
        nodata=-9999.0,
        seed=seed,
    )
    base.update(kw)
    return DemSpec(**base)


@pytest.fixture
def make_dem(tmp_path: Path):
    """Writes one georeferenced synthetic DEM: ``make_dem(name, **DemSpec fields)``."""

    def make(name: str = "dem.tif", data: np.ndarray | None = None, **kw: Any) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_dem(path, dem_spec(**kw), data)
        return path

    return make


@pytest.fixture(scope="session")
def dem_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve synthetic DEMs (read-only for tests: copy before changing)."""
    out = tmp_path_factory.mktemp("dems")
    generate_dems(out, 12, min_size=24, max_size=96, seed=7)
    return out


@pytest.fixture
def tiny_config(tmp_path: Path, dem_dir: Path) -> dict[str, Any]:
    return dict(
        TINY,
        input_dir=str(dem_dir),
        model_output_path=str(tmp_path / "out" / "m.pth"),
        max_epochs=2,
    )


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, dem_dir: Path):
    """A tiny model trained for 2 epochs on ``dem_dir`` (its TrainResult)."""
    from catchment_mae.trainer import train

    out = tmp_path_factory.mktemp("trained")
    cfg = dict(
        TINY,
        input_dir=str(dem_dir),
        model_output_path=str(out / "tiny.pth"),
        max_epochs=2,
    )
    return train(cfg, progress=False)


@pytest.fixture(scope="session")
def onnx_model(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trained`` exported to ONNX (no validation: the export tests do that)."""
    from catchment_mae.export.onnx import export_encoder

    out = tmp_path_factory.mktemp("embed") / "tiny.onnx"
    export_encoder(trained.weights_path, out, validate=False)
    return out


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """CLI tests configure the package logger (stderr handler, no propagation);
    undo that after each test so caplog sees library warnings again."""
    import logging

    yield
    pkg = logging.getLogger("catchment_mae")
    pkg.handlers.clear()
    pkg.propagate = True
    pkg.setLevel(logging.NOTSET)


# Shared by several test modules: archives, tables, a CLI training run.
TINY_FLAGS = [
    "--model", TINY["vit_model_name"], "--image-size", "32", "--patch-size", "8",
    "--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--batch-size", "4",
    "--num-workers", "0", "--epochs", "1", "--device", "cpu",
]  # fmt: skip


@pytest.fixture
def archive(tmp_path, dem_dir, real_dir):
    """DEMs in nested folders plus files that must fail."""
    d = tmp_path / "archive"
    for i, p in enumerate(sorted(dem_dir.glob("*.tif"))):
        target = d / ("a" if i % 2 else "b/c") / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    (d / "empty.tif").write_bytes(b"")
    (d / "b" / "text.TIF").write_text("not a tiff")
    shutil.copy(real_dir / "rasterio_corrupt.tif", d / "corrupt.tif")
    shutil.copy(real_dir / "rasterio_all-nodata.tif", d / "allnodata.tif")
    shutil.copy(real_dir / "rioxarray_small_dem_3m_merged.tif", d / "real_dem.tif")
    return d


def copies_of(dem_dir: Path, folder: Path, n: int, link: bool = False) -> Path:
    """``folder`` holding ``n`` rasters ``r000.tif``..., the DEMs of ``dem_dir``
    in turn (hard links with ``link``)."""
    folder.mkdir()
    dems = sorted(dem_dir.glob("*.tif"))
    place = os.link if link else shutil.copy
    for i in range(n):
        place(dems[i % len(dems)], folder / f"r{i:03d}.tif")
    return folder


@pytest.fixture
def big_archive(tmp_path, dem_dir):
    """300 small rasters: long enough a run to interrupt."""
    return copies_of(dem_dir, tmp_path / "big", 300)


def write_table(path, paths, vectors, errors=None):
    """An embeddings table as embed-dir writes it (only the columns eval reads
    filled in)."""
    n, dim = len(paths), vectors.shape[1]
    errors = errors or [None] * n
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catchment_mae.batch.schema import schema

    sch = schema(dim)
    cols = {f.name: pa.nulls(n, f.type) for f in sch}
    cols["path"] = pa.array(paths, pa.string())
    cols["error"] = pa.array(errors, pa.string())
    emb = [None if e else v.tolist() for v, e in zip(vectors, errors, strict=True)]
    cols["embedding"] = pa.array(emb, sch.field("embedding").type)
    pq.write_table(pa.table(cols, schema=sch), path)
    return path


def rewrite_embeddings(table, out, lengths=None):
    """``table`` as pandas or DuckDB write it again: embeddings as lists without
    a fixed size (``lengths``: cut each row to that many values)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(table)
    emb = t.column("embedding").to_pylist()
    if lengths is not None:
        emb = [None if e is None else e[:n] for e, n in zip(emb, lengths, strict=True)]
    i = t.schema.get_field_index("embedding")
    lists = pa.array(emb, pa.list_(pa.float64()))
    pq.write_table(t.set_column(i, pa.field("embedding", lists.type), lists), out)
    return out


def decoder_config(tmp_path: Path) -> Path:
    """A --config with a small decoder (the CLI has no decoder flags)."""
    p = tmp_path / "small_decoder.json"
    import json

    p.write_text(
        json.dumps({"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2})
    )
    return p


def cli_train(runner, tmp_path, input_dir, *extra, out="m.pth"):
    """``cmae train`` of a tiny model on ``input_dir`` through ``runner``."""

    from catchment_mae.cli.main import cli

    args = ["train", str(input_dir), "--out", str(tmp_path / out), *TINY_FLAGS]
    args += ["--config", str(decoder_config(tmp_path)), *extra]
    return runner.invoke(cli, args)


# ------------------------------------------------------------------ zones
# A synthetic DEM of 160 x 200 pixels of 30 m (EPSG:32633) cut into 2 x 2
# tiles, and polygons over it named by what each tries (embed-zones).
MOSAIC_PIXEL = 30.0
MOSAIC_ORIGIN = (500_000.0, 5_000_000.0)  # the upper-left corner
MOSAIC_SHAPE = (160, 200)


def mosaic_xy(col: float, row: float) -> tuple[float, float]:
    """A point of the mosaic by its pixel coordinates (corners are integers)."""
    x0, y0 = MOSAIC_ORIGIN
    return x0 + col * MOSAIC_PIXEL, y0 - row * MOSAIC_PIXEL


def mosaic_polygon(*pixels: tuple[float, float], holes=()):
    import shapely

    return shapely.Polygon(
        [mosaic_xy(*p) for p in pixels], [[mosaic_xy(*p) for p in h] for h in holes]
    )


def zone_polygons() -> dict[str, Any]:
    import shapely

    p = mosaic_polygon
    return {
        "inside": p((10, 10), (60, 12), (55, 70), (8, 50)),
        "corner": p(
            (70, 50),
            (140, 55),
            (130, 120),
            (75, 110),
            holes=[[(95, 75), (110, 75), (110, 90), (95, 90)]],
        ),  # fmt: skip
        "two_parts": shapely.MultiPolygon(
            [
                p((20, 100), (60, 100), (60, 150), (20, 150)),
                p((150, 10), (190, 10), (190, 60), (150, 60)),
            ]
        ),
        "bowtie": p((120, 100), (190, 150), (190, 100), (120, 150)),  # invalid
        "outside": p((300, 300), (340, 300), (340, 340), (300, 340)),
        "speck": p((5.1, 5.1), (5.3, 5.1), (5.3, 5.3), (5.1, 5.3)),  # no centre
    }


def write_zones(path: Path, zones: dict, crs: str = "EPSG:32633", to=None) -> Path:
    """A zones file (its format by its suffix) with columns gauge and area."""
    import pyarrow as pa
    import pyogrio
    import shapely

    geoms = list(zones.values())
    if to is not None:
        from pyproj import Transformer

        t = Transformer.from_crs(crs, to, always_xy=True)
        geoms = [shapely.transform(g, t.transform, interleaved=False) for g in geoms]
        crs = to
    table = pa.table(
        {
            "gauge": list(zones),
            "area": [float(g.area) for g in zones.values()],
            "geometry": shapely.to_wkb(geoms),
        }
    )
    pyogrio.write_arrow(
        table, path, geometry_name="geometry", geometry_type="Unknown", crs=crs
    )
    return path


@pytest.fixture(scope="session")
def mosaic_dem() -> np.ndarray:
    h, w = MOSAIC_SHAPE
    spec = dem_spec(height=h, width=w, seed=3, nodata=-9999.0)
    from catchment_mae.synth import dem_array

    return dem_array(spec).astype(np.float32)


@pytest.fixture(scope="session")
def mosaic_tiles(tmp_path_factory, mosaic_dem) -> Path:
    """``mosaic_dem`` as four GeoTIFF tiles of 80 x 100 pixels (read-only)."""
    d = tmp_path_factory.mktemp("mosaic")
    for r in range(2):
        for c in range(2):
            spec = dem_spec(
                height=80, width=100, origin=mosaic_xy(c * 100, r * 80),
                nodata=-9999.0,
            )  # fmt: skip
            block = mosaic_dem[r * 80 : r * 80 + 80, c * 100 : c * 100 + 100]
            write_dem(d / f"tile_{r}{c}.tif", spec, block)
    return d
