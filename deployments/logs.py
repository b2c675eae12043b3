"""Makes our modules' log lines (model conversion progress, load times) reach the replica's
stderr, which Ray forwards to `serve run`'s console and the Serve log files."""

import logging


def show_our_logs() -> None:
    for name in ("deployments", "serve_app"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
