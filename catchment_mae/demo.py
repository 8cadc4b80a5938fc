"""The embedded default job: synthetic DEMs, then a tiny scale-aware MAE on the CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from catchment_mae.config import TrainConfig
from catchment_mae.synth import generate_dems


def demo_config(out_dir: str | os.PathLike[str], epochs: int = 30) -> TrainConfig:
    """A ViT small enough to train in about a minute on 2 CPU cores."""
    out = Path(out_dir)
    return TrainConfig.from_dict(
        dict(
            input_dir=str(out / "dems"),
            model_output_path=str(out / "demo_model.pth"),
            vit_model_name="vit_tiny_patch16_224",
            image_size=64,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=4,
            decoder_dim=64,
            decoder_depth=1,
            decoder_num_heads=4,
            norm="per-raster",  # DEMs: embed the relief, not the altitude
            max_epochs=epochs,
            batch_size=16,
            num_workers=2,  # reads the DEMs once, into OUT/cache, on both cores
            cache_dir=str(out / "cache"),
            lr=1e-3,
            warmup_epochs=1.0,
            device="cpu",
        )
    )


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    count: int = 64,
    epochs: int = 30,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole pipeline: DEMs to ``OUT/dems``, ``OUT/demo_model.pth`` trained
    on them, its validated export ``OUT/demo_model.onnx``, the DEMs embedded with
    it into ``OUT/embeddings.parquet``, and each of the first DEMs' nearest
    neighbour by cosine similarity, read back from that table."""
    from catchment_mae.batch.runner import embed_dir
    from catchment_mae.export.onnx import export_encoder
    from catchment_mae.trainer import train

    cfg = demo_config(out_dir, epochs)
    onnx_path = Path(out_dir) / "demo_model.onnx"
    if (Path(cfg.weights_path).exists() or onnx_path.exists()) and not overwrite:
        from catchment_mae.errors import OutputExistsError

        raise OutputExistsError(f"{cfg.weights_path}: already exists (use --overwrite)")
    generate_dems(cfg.input_dir, count, min_size=40, max_size=320, seed=0)
    result = train(cfg, overwrite=overwrite, progress=progress)
    onnx_path = Path(out_dir) / "demo_model.onnx"
    report = export_encoder(cfg.weights_path, onnx_path, overwrite=overwrite)
    table = Path(out_dir) / "embeddings.parquet"
    embedded = embed_dir(cfg.input_dir, onnx_path, table, overwrite=True)
    summary = result.summary()
    first = result.history[0]
    summary.update(
        dems=cfg.input_dir,
        first_train_loss=first["train_loss"],
        loss_png=str(cfg.output_stem) + ".loss.png",
        preview_png=str(cfg.output_stem) + ".preview.png",
        onnx=str(onnx_path),
        onnx_max_abs=max(p.max_abs for p in report.parity),
        onnx_min_cos=min(p.min_cos for p in report.parity),
        embeddings=str(table),
        embedded=embedded.embedded,
        embed_failed=embedded.failed,
        neighbours=nearest_neighbours(table, count=3),
    )
    return summary


def nearest_neighbours(
    table: str | os.PathLike[str], count: int = 3, centre: bool = True
) -> list[dict]:
    """For the first ``count`` embedded rasters of ``table``: the most similar
    other raster by cosine similarity (what a user's first query would be).

    ``centre`` subtracts the table's mean embedding first: an MAE's embeddings
    share a large common component (raw cosines all near 1), and centring is
    what makes their cosines tell rasters apart.
    """
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(table, columns=["path", "embedding", "height", "width"])
    t = t.filter(pc.is_valid(t["embedding"]))
    emb = np.stack(t["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    if centre:
        emb -= emb.mean(axis=0)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    rows = t.select(["path", "height", "width"]).to_pylist()
    out = []
    for i in range(min(count, len(rows))):
        j = int(np.argmax(sim[i]))
        out.append({"query": rows[i], "nearest": rows[j], "cosine": float(sim[i, j])})
    return out
