"""Export of the trained encoder, with its scale input, to ONNX.

Installed inside the package namespace (setup.cfg ``package_dir``), never as a
top-level ``export`` module. :mod:`catchment_mae.export.onnx` traces the encoder
with its scale input (``cmae export``).
"""
