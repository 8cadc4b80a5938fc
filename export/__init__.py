"""Export of the trained encoder, with its scale input, to ONNX.

Installed inside the package namespace (setup.cfg ``package_dir``), never as a
top-level ``export`` module. The exporter itself lands with the ``cmae export`` issue.
"""
