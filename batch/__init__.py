"""Streaming TIFF directories through onnxruntime into Parquet: ``catchment_mae.batch``.

Installed inside the package namespace (setup.cfg ``package_dir``), never as a
top-level ``batch`` module. No torch anywhere in this package: ``cmae embed-dir``
must run in a base install. The runner lands with the ``cmae embed-dir`` issue.
"""
