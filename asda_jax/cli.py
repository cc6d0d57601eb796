"""Helpers for the command-line scripts under launch/."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

NOISY_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/grain/")


class _QuietLibraries(logging.Filter):
    """Drops INFO records of chatty libraries; their warnings and errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            part in record.pathname for part in NOISY_LIBRARIES
        )


def quiet_library_logs() -> None:
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
