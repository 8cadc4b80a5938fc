"""Streaming TIFF directories through onnxruntime into Parquet: ``catchment_mae.batch``.

Installed inside the package namespace (setup.cfg ``package_dir``), never as a
top-level ``batch`` module. No torch anywhere in this package: ``cmae embed-dir``
must run in a base install. The stages: :mod:`.reader` (files to rows and
samples), :mod:`.mapper` (onnxruntime), :mod:`.writer` (Parquet parts and the
table), wired by :mod:`.runner` (or :mod:`.ray_runner`).
"""
