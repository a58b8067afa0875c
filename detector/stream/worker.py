"""``detector worker``: run one Faust worker of the detector.

    python -m detector.stream.worker          # settings from DETECTOR_* environment variables

Creates the topics it needs (idempotent), then runs until SIGTERM/SIGINT. Each worker of a
deployment needs its own ``DETECTOR_WEB_PORT`` and ``DETECTOR_DATA_DIR`` when they share a host.
"""

from __future__ import annotations

import asyncio
import logging

from detector.config import Settings, load_settings

log = logging.getLogger("detector.stream")


def run_worker(settings: Settings, *, create_topics: bool = True) -> None:
    """Run a worker in the foreground until it is stopped (blocks; exits the process)."""
    from detector.runtime import check_pii_key, tune_gc
    from detector.stream import faust_internals, io, lograte
    from detector.stream.app import make_app

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    check_pii_key(settings, "a worker")
    lograte.install()
    from detector.stream.kafka_security import describe

    log.info("kafka: %s at %s", describe(settings), settings.kafka_bootstrap)
    if create_topics:  # also checks, within seconds, that the brokers accept our credentials
        asyncio.run(io.acreate_topics(settings))
    tune_gc()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    small_caches()
    app = make_app(settings)
    app.rt.intel.cache_size = WORKER_CACHE_ENTRIES
    faust_internals.check_app(app)  # refuse to run without the project's consumer
    level = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error",
             "CRITICAL": "crit"}.get(settings.log_level.upper(), "info")
    worker = _worker_class()(app, loglevel=level, quiet=True)
    worker.execute_from_commandline()


WORKER_CACHE_ENTRIES = 20_000  # parsed numbers, IP lookups: the recurring ones


def small_caches() -> None:
    """A worker's memory is its tables: the replay path's caches of parsed numbers and IP
    lookups (200,000 entries each) held ~130 MB in a unique-key flood (bench_memory.py); a
    worker keeps the 20,000 most recent (the numbers and IPs that recur)."""
    from detector.core import phone

    phone.set_cache_size(WORKER_CACHE_ENTRIES)


def _worker_class() -> type:
    from faust import Worker

    from detector.stream import lograte
    from detector.stream.faust_internals import StopDeadlineMixin

    class DetectorWorker(StopDeadlineMixin, Worker):
        """Faust's worker without the terminal spinner, which adds a DEBUG handler to the root
        logger and so makes every library's debug message build a LogRecord (10 % of CPU);
        log volume bounded (:mod:`detector.stream.lograte`); a stop takes at most 9 s."""

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            self.spinner = None
            logger.setLevel(level or logging.INFO)
            lograte.install(logger)

    return DetectorWorker


def main() -> None:
    import sys

    from detector.core.errors import DetectorError

    try:
        run_worker(load_settings())
    except DetectorError as exc:  # a configuration or connection error: one line, no traceback
        sys.stderr.write(f"detector worker: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
