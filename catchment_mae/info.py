"""``cmae info``: what an exported encoder, trained weights or an embeddings table
hold (no torch)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.errors import CmaeError


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-able description of an ``.onnx`` encoder, ``.pth`` weights (from
    the ``NAME.json`` beside them) or a ``.parquet`` table.

    Raises:
        CmaeError: missing file, another kind of file, or unreadable.
    """
    from catchment_mae.batch.writer import parts_dir

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".onnx", ".parquet", ".pth"):
        raise CmaeError(
            f"{p}: cmae info reads .onnx encoders, .pth weights (with their "
            ".json) and .parquet tables"
        )
    if not p.is_file() and not (suffix == ".parquet" and parts_dir(p).is_dir()):
        raise CmaeError(f"{p}: no such file")
    if suffix == ".pth":
        return describe_weights(p)
    return describe_onnx(p) if suffix == ".onnx" else describe_table(p)


def describe_weights(path: Path) -> dict[str, Any]:
    """Trained weights: the config they were trained with (``NAME.json``), the
    last epoch of ``NAME.metrics.jsonl`` and whether an ``NAME.onnx`` is beside
    them. Epoch checkpoints (``NAME.ckpt.pth``) are read by ``cmae train
    --resume``, not here."""
    from catchment_mae.config import TrainConfig, model_files

    if path.name.endswith(".ckpt.pth"):
        raise CmaeError(
            f"{path}: an epoch checkpoint; continue it with cmae train --resume "
            f"{path}, or describe the weights beside it"
        )
    _, cfg_path = model_files(path)
    cfg = TrainConfig.from_json(cfg_path)
    last = None
    metrics = cfg_path.with_suffix(".metrics.jsonl")
    if metrics.is_file():
        with contextlib.suppress(OSError, ValueError):
            lines = metrics.read_text().splitlines()
            last = json.loads(lines[-1]) if lines else None
    onnx = path.with_suffix(".onnx")
    return {
        "kind": "weights",
        "path": str(path),
        "file_size": path.stat().st_size,
        "config": cfg.to_dict(),
        "last_epoch": last,
        "onnx": str(onnx) if onnx.is_file() else None,
    }


def describe_onnx(path: Path) -> dict[str, Any]:
    from catchment_mae.io import sha256_file
    from catchment_mae.runtime import create_session, read_metadata

    sess = create_session(path, "cpu", threads=1)
    meta = read_metadata(sess, path)

    def io(args: Any) -> list[dict[str, Any]]:
        return [{"name": a.name, "shape": a.shape, "type": a.type} for a in args]

    return {
        "kind": "onnx",
        "path": str(path),
        "file_size": path.stat().st_size,
        "sha256": sha256_file(path),
        "inputs": io(sess.get_inputs()),
        "outputs": io(sess.get_outputs()),
        "metadata": {
            k: v if k.endswith("sha256") else _maybe_json(v)
            for k, v in sorted(meta.items())
        },
    }


def describe_table(path: Path) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from catchment_mae.batch import schema as table
    from catchment_mae.batch.writer import parts_dir
    from catchment_mae.runtime import MetaKey

    parts = sorted(parts_dir(path).glob("part-*.parquet"))
    out: dict[str, Any] = {"kind": "parquet", "path": str(path)}
    if path.is_file():
        try:
            pf = pq.ParquetFile(path)
            errors = pf.read(columns=["error", "geometry"])
        except Exception as e:  # pyarrow raises several types: keep the reason
            raise CmaeError(f"{path}: not a readable Parquet table ({e})") from e
        meta = table.key_values(pf.schema_arrow)
        failed = errors.num_rows - pc.sum(pc.is_null(errors["error"])).as_py()
        model_meta = _maybe_json(meta.get(table.MODEL_METADATA, "{}"))
        out.update(
            file_size=path.stat().st_size,
            rows=pf.metadata.num_rows,
            embedded=pf.metadata.num_rows - failed,
            failed=failed,
            with_footprint=errors.num_rows - errors["geometry"].null_count,
            row_groups=pf.metadata.num_row_groups,
            cmae_version=meta.get(table.CMAE_VERSION),
            cmae_format_version=meta.get(table.FORMAT_VERSION),
            created=meta.get(table.CREATED),
            model=meta.get(table.MODEL),
            model_sha256=meta.get(table.MODEL_SHA256),
            vit_model_name=model_meta.get(MetaKey.VIT_MODEL_NAME),
            embedding_dim=_maybe_json(model_meta.get(MetaKey.EMBEDDING_DIM, "null")),
            geo=_maybe_json(meta["geo"]) if "geo" in meta else None,
            schema=[{"name": f.name, "type": str(f.type)} for f in pf.schema_arrow],
        )
        if "tile_row" in pf.schema_arrow.names:
            out["chips"] = _chips(pf.read(columns=["path", "tile_row", "error"]))
            out["chips"]["grid"] = _maybe_json(meta.get(table.CHIP_GRID, "null"))
    else:
        out.update(rows=0, note="no table yet: an unfinished run's parts only")
    if parts:
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        out["unfinished_run"] = {
            "parts": len(parts),
            "rows": rows,
            "hint": "run the same cmae embed-dir command to continue and merge them",
        }
    return out


def render(info: dict[str, Any]) -> str:
    """The description for a terminal."""
    if info["kind"] == "weights":
        return _render_weights(info)
    if info["kind"] == "onnx":
        from catchment_mae.runtime import MetaKey as K

        meta = info["metadata"]
        lines = [
            f"{info['path']}: cmae encoder (format {meta.get(K.FORMAT_VERSION)}, "
            f"written by cmae {meta.get(K.CMAE_VERSION)})",
            f"  model:      {meta.get(K.VIT_MODEL_NAME)}, embedding width "
            f"{meta.get(K.EMBEDDING_DIM)}, pool {meta.get(K.POOL)}",
        ]
        for a in info["inputs"]:
            lines.append(f"  input:      {a['name']} {a['shape']} {a['type']}")
        for a in info["outputs"]:
            lines.append(f"  output:     {a['name']} {a['shape']} {a['type']}")
        channels = meta.get(K.CHANNELS) or []
        lines += [
            f"  image:      {meta.get(K.IMAGE_SIZE)} px, {meta.get(K.IN_CHANS)} "
            f"band(s), bands {meta.get(K.BANDS) or 'all'}",
            *(f"  channel {i}:  {name}" for i, name in enumerate(channels)),
            f"  normalise:  {_norm(meta)}",
            f"  resize:     {meta.get(K.RESIZE)}",
            f"  scale:      {meta.get(K.SCALE_DEFINITION)}, eps "
            f"{meta.get(K.SCALE_EPS)}",
            f"  nodata:     {str(meta.get(K.NODATA_POLICY)).removeprefix('nodata: ')}",
            *(
                [f"  embedding:  {meta[K.EMBEDDING_LAYOUT]}"]
                if meta.get(K.EMBEDDING_LAYOUT)
                else []
            ),
            f"  weights:    sha256 {meta.get(K.WEIGHTS_SHA256)}",
            f"  file:       {info['file_size']} bytes, sha256 {info['sha256']}",
        ]
        return "\n".join(lines)
    from catchment_mae.batch.writer import grid_text

    lines = [f"{info['path']}: cmae embeddings table"]
    if "rows" in info and "schema" in info:
        lines += [
            f"  rows:       {info['rows']} ({info['embedded']} embedded, "
            f"{info['failed']} failed; {info['with_footprint']} with a footprint)",
            f"  model:      {info['model']} ({info['vit_model_name']}, width "
            f"{info['embedding_dim']}), sha256 {info['model_sha256']}",
            f"  written:    {info['created']} by cmae {info['cmae_version']} "
            f"(format {info['cmae_format_version']})",
            "  columns:    "
            + ", ".join(f"{c['name']} {c['type']}" for c in info["schema"]),
        ]
        if "chips" in info:
            c = info["chips"]
            lines.insert(
                2,
                f"  chips:      {c['chips']} of {c['rasters']} raster(s), "
                f"{c['min_per_raster']}-{c['max_per_raster']} per raster "
                f"(median {c['median_per_raster']:g})"
                + (f"; {grid_text(c['grid'])}" if c.get("grid") else ""),
            )
        bbox = ((info.get("geo") or {}).get("columns", {}).get("geometry", {})).get(
            "bbox"
        )
        if bbox:
            lon = f"{bbox[0]:.4f}..{bbox[2]:.4f}"
            lat = f"{bbox[1]:.4f}..{bbox[3]:.4f}"
            lines.append(f"  footprints: lon {lon}, lat {lat} (OGC:CRS84)")
    else:
        lines.append(f"  {info.get('note')}")
    if "unfinished_run" in info:
        u = info["unfinished_run"]
        lines.append(
            f"  unfinished: {u['rows']} row(s) in {u['parts']} part file(s); "
            f"{u['hint']}"
        )
    return "\n".join(lines)


def _render_weights(info: dict[str, Any]) -> str:
    c, last = info["config"], info["last_epoch"]
    shape = ", ".join(
        f"{k.replace('_', ' ')} {c[k]}"
        for k in ("patch_size", "embed_dim", "depth")
        if c.get(k) is not None
    )
    lines = [
        f"{info['path']}: cmae weights (config format {c.get('format_version')}, "
        f"{info['file_size']} bytes)",
        f"  model:      {c['vit_model_name']} at {c['image_size']} px"
        + (f" ({shape})" if shape else "")
        + f", pool {c['pool']}",
        f"  input:      {c['in_chans']} band(s), bands {c['bands'] or 'all'}, norm "
        f"{c['norm']}, scale {c['scale']}"
        + (", slope channel" if c.get("slope_channel") else "")
        + (" and its statistics" if c.get("slope_stats") else ""),
        f"  trained on: {c['input_dir']}, {c['max_epochs']} epoch(s), batch "
        f"{c['batch_size']}",
    ]
    if last:
        loss = last.get("train_loss")
        lines.append(
            f"  last epoch: {last.get('epoch')}, train loss "
            + (f"{loss:.4f}" if isinstance(loss, float) else str(loss))
        )
    lines.append(
        f"  encoder:    {info['onnx']}"
        if info["onnx"]
        else f"  encoder:    none yet: cmae export {info['path']} --out "
        f"{Path(info['path']).with_suffix('.onnx')}"
    )
    return "\n".join(lines)


def _chips(table: Any) -> dict[str, Any]:
    """Chips per raster of a table written with --tile (failed rasters left out)."""
    import pyarrow.compute as pc

    good = table.filter(pc.is_valid(table["tile_row"]))
    counts = pc.value_counts(good["path"]).field("counts").to_numpy()
    if not len(counts):
        return {"chips": 0, "rasters": 0, "min_per_raster": 0, "max_per_raster": 0,
                "median_per_raster": 0}  # fmt: skip
    return {
        "chips": int(counts.sum()),
        "rasters": len(counts),
        "min_per_raster": int(counts.min()),
        "max_per_raster": int(counts.max()),
        "median_per_raster": float(np.median(counts)),
    }


def _norm(meta: dict[str, Any]) -> str:
    from catchment_mae.runtime import MetaKey as K

    if meta.get(K.NORM) == "per-raster":
        return "per raster (each raster's own valid mean/std)"
    return f"mean {meta.get(K.NORM_MEAN)}, std {meta.get(K.NORM_STD)}"


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value
