"""The package's version, in a module of its own: the modules that record it
(checkpoints, tables, encoders) import it without importing the package's
entry points."""

__version__ = "0.1.0"
