"""nnterp 1.x's ``nnterp.logging``: nnterp's logger (defined in :mod:`nnterp.core.log`)."""

from .core.log import logger

__all__ = ["logger"]
