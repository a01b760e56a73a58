"""`python -m service`: run the server on HOST:PORT from the settings, draining on SIGTERM
(service/shutdown.py)."""

import sys

from service.app import configure_logging, create_app
from service.config import load_settings
from service.shutdown import serve


def main() -> int:
    settings = load_settings()
    configure_logging(settings)
    # log_config=None: uvicorn's loggers keep configure_logging's handler (LOG_FORMAT, request ids).
    return serve(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                 log_config=None)


if __name__ == "__main__":
    sys.exit(main())
