"""The daemon's version: pyproject.toml's, as installed (the one place it is written)."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("npuserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
