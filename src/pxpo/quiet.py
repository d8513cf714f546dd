"""Silence library messages that tell a pxpo user nothing they can act on.

transformers logs, in every process that loads a diffusers pipeline, that
``CLIPImageProcessor`` / ``SiglipImageProcessor`` "requires torchvision (not
installed)" and falls back to the PIL implementation. pxpo never uses an
image processor (no safety checker, no feature extractor), so the message is
dropped by a logging filter on that one logger; everything else transformers
logs is untouched.
"""

from __future__ import annotations

import logging

_LOGGER = "transformers.utils.import_utils"
_MESSAGE = "requires torchvision (not installed)"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _MESSAGE not in record.getMessage()


def silence_uninformative_warnings() -> None:
    """Install the filter (idempotent)."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())
