"""Makes our modules' log lines (model conversion progress, load times, the engine's device and
weights) reach the replica's stderr, which Ray forwards to `serve run`'s console."""

import logging
import sys


def show_our_logs() -> None:
    for name in ("deployments", "serve_app"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            # The process's own stderr: Serve's throughput-optimized mode (serve.env) points
            # sys.stderr at its log files, where lines wait in a buffer of 1,000.
            handler = logging.StreamHandler(sys.__stderr__)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
