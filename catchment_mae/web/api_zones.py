"""Routes of the Catchments page: embed a zones file over a raster folder (a
background job of ``batch.zone_runner.embed_zones``), then the polygons of a
table of zones as GeoJSON and, for a clicked one, every zone's similarity to
it and the most similar listed (``catchment_mae.search.nearest``)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request

from catchment_mae.batch import schema
from catchment_mae.errors import CmaeError
from catchment_mae.web import common
from catchment_mae.web.api_embed import table_output, table_work
from catchment_mae.web.common import settings, state
from catchment_mae.web.security import Refused, as_named, confine, held, open_inside

bp = Blueprint("zones", __name__)
ZONES_FIELDS = ("rasters", "zones", "model_path", "id", "name", "overwrite")
# Zones files the page offers and takes: single files (a Shapefile's sidecars
# cannot be read through one descriptor; convert it, or use the command).
ZONE_SUFFIXES = (".gpkg", ".geojson", ".json", ".fgb", ".parquet")
MAP_ZONES = 20_000  # polygons a map shows at most
# A zones file a job may read (all its polygons are held at once): HydroBASINS'
# finest level for a continent is about 200 MB as a GeoPackage.
MAX_ZONES_MB = 512
MAX_K = 1000


@bp.post("/api/embed-zones")
def start_embed_zones() -> tuple[Response, int]:
    values = common.params(ZONES_FIELDS)
    s = settings()
    rasters = confine(s.data_root, values.get("rasters"), "rasters", "--data-root")
    zones = common.file_of(values, "zones", set(ZONE_SUFFIXES))
    if zones.stat().st_size > MAX_ZONES_MB << 20:
        raise Refused(
            400, f"zones: larger than {MAX_ZONES_MB} MB (split it, or use the "
            "command)", "zones",
        )  # fmt: skip
    model = common.model_path(values, {".onnx"})
    id_column = str(values.get("id") or "").strip() or None
    out = table_output(common.name(values, "name"))
    overwrite = common.flag(values.get("overwrite"))
    data_root = s.data_root
    zones_name = zones.relative_to(data_root).as_posix()

    def run(target: Path, on_item: Any) -> Any:
        from catchment_mae.batch.zone_runner import embed_zones

        # The zones are read through the descriptor opened here (a name
        # swapped for a link that leads out is refused, never followed).
        with held(data_root, zones, "zones") as opened:
            try:
                return embed_zones(
                    rasters, opened, model, target, id_column=id_column,
                    overwrite=overwrite, within=data_root, on_item=on_item,
                )  # fmt: skip
            except CmaeError as e:  # named as the request named it
                raise CmaeError(as_named(str(e), {opened: zones_name})) from e

    job = state().jobs.start("embed-zones", values, table_work(out, run))
    return jsonify(status="started", job=job.id, url=f"/jobs/{job.id}"), 202


@bp.get("/api/zones/tables")
def zone_tables() -> Response:
    """The tables of zones under --model-root's embeddings folder."""
    root = settings().model_root
    folder = root / "embeddings"
    found = []
    if folder.is_dir() and not folder.is_symlink():
        for path in sorted(folder.glob("*.parquet")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                meta = _open(root, path).metadata
            except Refused:
                continue
            if schema.ZONES in meta:
                found.append(path.relative_to(root).as_posix())
    return jsonify(tables=found)


@bp.get("/api/zones/map")
def zone_map() -> Response:
    """The table's polygons as a GeoJSON FeatureCollection (OGC:CRS84): each
    zone's id, error and its own columns that are plain values."""
    import pyarrow as pa
    import shapely

    tab = _table()
    if tab.rows > MAP_ZONES:
        raise Refused(
            400, f"table: {tab.rows} zones, a map shows at most {MAP_ZONES}", "table"
        )
    plain = [
        f.name
        for f in tab.pf.schema_arrow
        if f.name not in ("embedding", "geometry", "bbox")
        and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
             or pa.types.is_string(f.type) or pa.types.is_boolean(f.type))
    ]  # fmt: skip
    t = tab.pf.read(columns=[*plain, "geometry"])  # not the embeddings
    columns = {name: t.column(name).to_pylist() for name in plain}
    geometries = t.column("geometry").to_pylist()
    features = []
    for i, wkb in enumerate(geometries):
        if wkb is None:
            continue
        props = {name: _json_value(columns[name][i]) for name in plain}
        features.append(
            {
                "type": "Feature",
                "id": columns["path"][i],
                "geometry": json.loads(shapely.to_geojson(shapely.from_wkb(wkb))),
                "properties": props,
            }
        )
    return jsonify(type="FeatureCollection", features=features)


@bp.get("/api/zones/similar")
def zone_similar() -> Response:
    """Every embedded zone's cosine similarity to zone ``id`` (for the map's
    colours) and the ``k`` most similar others with their columns; with
    ``format=csv``, those k as a CSV download."""
    from catchment_mae.search import nearest

    tab = _table()
    key = str(request.args.get("id") or "")
    try:
        k = int(request.args.get("k") or 10)
    except ValueError:
        raise Refused(400, "k: a whole number", "k") from None
    if not 1 <= k <= MAX_K:
        raise Refused(400, f"k: between 1 and {MAX_K}", "k")
    try:
        row = tab.find(key)
        query = tab.vector(row)
        ranked = nearest(tab, query, k=tab.rows, exclude=row)
    except CmaeError as e:
        raise Refused(400, f"id: {str(e).split(': ', 1)[-1]}", "id") from e
    hits = tab.describe(ranked[:k])
    keys = tab.values_at([h.row for h in ranked], ["path"])["path"]
    similarity = {p: round(h.similarity, 6) for p, h in zip(keys, ranked, strict=True)}
    similarity[key] = 1.0
    nearest_rows = [h.to_dict() for h in hits]
    if request.args.get("format") == "csv":
        return _csv(nearest_rows, f"like-{key}.csv")
    recorded = json.loads(tab.metadata.get(schema.ZONES) or "{}")
    own = [  # the zones' own columns, their id apart (it is the path)
        c for c in tab.columns
        if c not in (*schema.ROW_COLUMNS, schema.VALID_FRACTION)
        and c != recorded.get("id")
    ]  # fmt: skip
    return jsonify(id=key, similarity=similarity, nearest=nearest_rows, columns=own)


def _table() -> Any:
    """The table the request names (``table``, under --model-root)."""
    root = settings().model_root
    path = confine(root, request.args.get("table"), "table", "--model-root")
    if path.suffix.lower() != ".parquet" or not path.is_file():
        raise Refused(400, "table: expected a .parquet table of zones", "table")
    return _open(root, path)


def _open(root: Path, path: Path) -> Any:
    """A table opened through its descriptor (search.Table), refused unless
    it is a table of zones."""
    import pyarrow.parquet as pq

    from catchment_mae.search import Table

    fd = open_inside(root, path, "table")
    try:
        pf = pq.ParquetFile(os.fdopen(fd, "rb"))
    except Exception as e:  # pyarrow raises several types: not Parquet
        raise Refused(400, "table: not a Parquet table", "table") from e
    names = pf.schema_arrow.names
    if "embedding" not in names or "geometry" not in names:
        raise Refused(400, "table: not an embeddings table", "table")
    return Table(path, pf, schema.key_values(pf.schema_arrow))


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def _csv(rows: list[dict[str, Any]], name: str) -> Response:
    text = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(v) for k, v in r.items()})
    return Response(
        text.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
