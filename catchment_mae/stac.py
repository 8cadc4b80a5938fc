"""A STAC Item beside an embeddings table, so catalogues can index the run.

The Item describes the table (its footprint, when it was made, where its
rasters came from) with the Embedding extension's fields (``emb:*``: one
embedding per raster or chip, its width and data type, the chip layout, no
quantisation, the run's parameters) and the encoder with the MLM extension's
(``mlm:*``: a Vision Transformer in ONNX, its inputs and output). Everything is
read from the table's own metadata: no torch, no network.

The Embedding extension is a proposal without a published schema yet, so only
MLM and Processing are listed in ``stac_extensions``; its fields follow the
proposal's names.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from catchment_mae.batch import schema as table
from catchment_mae.errors import CmaeError
from catchment_mae.io import atomic_write_text
from catchment_mae.runtime import MetaKey
from catchment_mae.version import __version__

STAC_VERSION = "1.1.0"
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
# Dimension names of each encoder input, as MLM's dim_order spells them.
DIM_ORDER = {
    "image": ["batch", "channel", "height", "width"],
    "scale": ["batch", "embedding"],
    "valid": ["batch", "channel", "height", "width"],
}


def item_path(out: str | os.PathLike[str]) -> Path:
    """Where the Item of table ``out`` goes: ``OUT.stac.json`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".stac.json")


def write_item(out: str | os.PathLike[str], model: str | os.PathLike[str]) -> Path:
    """Writes the Item of table ``out``, embedded with ``model`` (atomically)."""
    path = item_path(out)
    atomic_write_text(path, json.dumps(item(out, model), indent=2) + "\n")
    return path


def item(out: str | os.PathLike[str], model: str | os.PathLike[str]) -> dict[str, Any]:
    """The STAC Item of the embeddings table ``out`` (a dict, JSON-ready)."""
    import pyarrow.parquet as pq

    out, model = Path(out), Path(model)
    try:
        pf = pq.ParquetFile(out)
    except Exception as e:  # pyarrow raises several types
        raise CmaeError(f"{out}: not a readable embeddings table") from e
    meta = table.key_values(pf.schema_arrow)
    if table.MODEL_METADATA not in meta:
        raise CmaeError(f"{out}: not an embeddings table of cmae embed-dir")
    encoder = json.loads(meta[table.MODEL_METADATA])
    bbox = _bbox(meta)
    created = meta.get(table.CREATED)
    props: dict[str, Any] = {
        "datetime": created,
        "processing:datetime": created,
        "processing:software": {
            "catchment-mae": meta.get(table.CMAE_VERSION, __version__)
        },
        **_embedding_fields(meta, encoder, pf),
        **_mlm_fields(encoder, model),
    }
    here = _item_dir(out)
    listing = json.loads(meta.get(table.LISTING, "null")) or {}
    links = [
        {"rel": "emb:model", "href": _href(model, here),
         "type": "application/octet-stream", "title": "the encoder (ONNX)"},
    ]  # fmt: skip
    if listing.get("root"):
        source = _href(Path(listing["root"]), here)
        links.append({"rel": "emb:source-data", "href": source,
                      "title": "the rasters embedded (a folder of TIFFs)"})  # fmt: skip
    if listing.get("zones"):  # embed-zones: the polygons
        zones = _href(Path(listing["zones"]), here)
        links.append({"rel": "emb:source-data", "href": zones,
                      "title": "the zones embedded (one row a polygon)"})  # fmt: skip
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [MLM_SCHEMA, PROCESSING_SCHEMA],
        "id": out.stem,
        "geometry": _polygon(bbox),
        "bbox": list(bbox) if bbox else None,
        "properties": props,
        "links": links,
        "assets": {
            "embeddings": {
                "href": _href(out, here),
                "type": "application/vnd.apache.parquet",
                "title": "one embedding per raster or chip (GeoParquet)",
                "roles": ["data"],
            },
            "model": {
                "href": _href(model, here),
                "type": "application/octet-stream; application=onnx",
                "title": "the encoder",
                "roles": ["mlm:model"],
                "mlm:artifact_type": "onnx",
            },
        },
    }


def _embedding_fields(meta: dict[str, str], encoder: dict[str, str], pf: Any) -> dict:
    """The Embedding extension's fields."""
    grid = json.loads(meta.get(table.CHIP_GRID, "null"))
    fields: dict[str, Any] = {
        "emb:type": "chip",  # one vector per raster or chip (not per pixel)
        "emb:dimensions": int(encoder[MetaKey.EMBEDDING_DIM]),
        "data_type": "float32",
        "emb:quantization": {"method": "none", "original_dtype": "float32"},
        "emb:fit_for_use": ["similarity_search", "retrieval", "classification"],
        "emb:runtime_parameters": {
            "preprocess": json.loads(encoder[MetaKey.PREPROCESS]),
            "pool": encoder.get(MetaKey.POOL),
            "embedding_layout": encoder.get(MetaKey.EMBEDDING_LAYOUT),
            "rows": int(pf.metadata.num_rows),
            "source_sha256": _source_hash(pf, table.ZONES in meta),
        },
    }
    if table.ZONES in meta:  # the zones file, its CRS, id column and chips
        fields["emb:runtime_parameters"]["zones"] = json.loads(meta[table.ZONES])
    if grid is not None:
        fields["emb:chip_layout"] = _chip_layout(grid)
    return fields


def _chip_layout(grid: dict[str, Any]) -> dict[str, Any]:
    """embed-dir's chip grid as the Embedding extension's Chip Layout Object."""
    if grid.get("unit", "px") == "px":
        tile = int(grid["tile"])
        stride = int(grid.get("stride") or tile)
        return {"layout_type": "regular_grid", "chip_size": [tile, tile],
                "stride": [stride, stride]}  # fmt: skip
    # Chips of a ground size: as many pixels as cover it, raster by raster.
    return {
        "layout_type": "variable_grid",
        "grid_id": f"{grid['tile']:g} m chips every {grid['stride']:g} m",
    }


def _mlm_fields(encoder: dict[str, str], model: Path) -> dict[str, Any]:
    """The MLM extension's description of the encoder, from its metadata."""
    size = int(encoder[MetaKey.IMAGE_SIZE])
    chans = len(json.loads(encoder[MetaKey.CHANNELS]))
    shapes = {
        "image": [-1, chans, size, size],
        "scale": [-1, int(encoder[MetaKey.SCALE_DIM])],
        "valid": [-1, 1, size, size],
    }
    described = {
        "image": "the raster's bands standardised, then its slope channel where "
        "the encoder has one: " + "; ".join(json.loads(encoder[MetaKey.CHANNELS])),
        "scale": encoder.get(MetaKey.SCALE_DEFINITION, "the scale vector"),
        "valid": "each pixel's valid share (1 = valid), after the resize",
    }
    inputs = [
        {
            "name": name,
            "bands": [],
            "input": {
                "shape": shapes[name],
                "dim_order": DIM_ORDER[name],
                "data_type": "float32",
            },  # fmt: skip
            "description": described[name],
            "value_scaling": None,
            "resize_type": None,
            "pre_processing_function": {
                "format": "python",
                "expression": "catchment_mae.preprocess:load_sample",
            },
        }
        for name in json.loads(encoder[MetaKey.INPUTS])
    ]
    dim = int(encoder[MetaKey.EMBEDDING_DIM])
    return {
        "mlm:name": model.stem,
        "mlm:architecture": "Vision Transformer",
        "mlm:tasks": ["similarity-search"],
        "mlm:framework": "ONNX",
        "mlm:pretrained": False,
        "mlm:pretrained_source": None,
        "mlm:accelerator": None,
        "mlm:input": inputs,
        "mlm:output": [
            {
                "name": "embedding",
                "tasks": ["similarity-search"],
                "result": {
                    "shape": [-1, dim],
                    "dim_order": ["batch", "embedding"],
                    "data_type": "float32",
                },  # fmt: skip
                "description": encoder.get(MetaKey.EMBEDDING_LAYOUT, ""),
            }
        ],
    }


def _bbox(meta: dict[str, str]) -> tuple[float, float, float, float] | None:
    """The table's footprint box (GeoParquet's ``geo`` metadata), if any."""
    try:
        geo = json.loads(meta["geo"])
        box = geo["columns"][geo["primary_column"]]["bbox"]
    except (KeyError, TypeError, ValueError):
        return None
    return tuple(float(v) for v in box) if box and len(box) == 4 else None  # type: ignore[return-value]


def _polygon(bbox: tuple[float, float, float, float] | None) -> dict | None:
    if bbox is None:
        return None
    x0, y0, x1, y1 = bbox
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def _source_hash(pf: Any, zones: bool = False) -> str:
    """sha256 of the rows' path, file size and mtime: which rasters, as they
    were when embedded; for a table of zones, of each zone's id and polygon."""
    h = hashlib.sha256()
    cols = ["path", "geometry"] if zones else ["path", "file_size", "mtime"]
    for batch in pf.iter_batches(columns=cols):
        for path, *facts in zip(*(batch.column(c).to_pylist() for c in cols),
                                strict=True):  # fmt: skip
            if zones:  # the polygon's WKB
                facts = [hashlib.sha256(facts[0] or b"").hexdigest()]
            line = "\0".join(str(v) for v in [path, *facts])
            h.update(f"{line}\n".encode(errors="surrogateescape"))
    return h.hexdigest()


def _item_dir(out: Path) -> Path:
    return item_path(out).parent.resolve()


def _href(path: Path, here: Path) -> str:
    """``path`` relative to the Item's folder where it can be, else absolute."""
    target = path.resolve()
    try:
        return os.path.relpath(target, here)
    except ValueError:  # another drive (Windows)
        return str(target)
