"""MetaSchedule's loggers during a tuning run: quiet on the console, and the host's handlers left alone.

`create_loggers` (tvm/s_tir/meta_schedule/logging.py) builds a `dictConfig` from the names of
the handlers already on the `tvm.s_tir.meta_schedule` logger: an unnamed one (pytest 9 puts its
LogCaptureHandlers there; any application may) makes it fail with `'NoneType' object has no
attribute 'format'`, a named one it did not create makes dictConfig fail, and dictConfig then
strips every handler the host had. So for the length of a tuning run the logger holds only
MetaSchedule's own handlers, and afterwards it is put back as it was found.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

LOGGER = "tvm.s_tir.meta_schedule"


def _close_handlers(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def metaschedule_logging() -> Iterator["QuietLogs"]:
    """Within: MetaSchedule's logger without the host's handlers, console at ERROR. After: as found."""
    logger = logging.getLogger(LOGGER)
    saved_handlers, saved_level, saved_propagate = list(logger.handlers), logger.level, logger.propagate
    for handler in saved_handlers:
        logger.removeHandler(handler)
    existing = set(logging.root.manager.loggerDict)
    quiet = QuietLogs(logger)
    quiet.before_config()
    try:
        yield quiet
    finally:
        _close_handlers(logger)
        # the per-task loggers MetaSchedule made hold open files in the work dir: close them
        for name in set(logging.root.manager.loggerDict) - existing:
            if name.startswith(LOGGER + "."):
                _close_handlers(logging.getLogger(name))
        for handler in saved_handlers:
            logger.addHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


class QuietLogs:
    """Call `before_config()` before each `extracted_tasks_to_tune_contexts` and `after_config()` after it."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def before_config(self) -> None:
        # create_loggers makes its console handler at the logger's level: ERROR keeps stdout quiet
        # (the files under work_dir/logs keep everything); its config lists only its own handlers
        _close_handlers(self._logger)
        self._logger.setLevel(logging.ERROR)

    def after_config(self) -> None:
        # create_loggers leaves the logger at DEBUG, which the next group's console would inherit
        self._logger.setLevel(logging.ERROR)
