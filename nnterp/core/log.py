"""nnterp's logger (``logging.getLogger("nnterp")``), with a default handler so its messages show."""

import logging

logger = logging.getLogger("nnterp")

if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s | %(name)s | %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)

__all__ = ["logger"]
