"""The demo: `python -m f8tensor.demo` trains a small transformer in bf16 and in float8 (run.py)."""

from .run import main

__all__ = ["main"]
