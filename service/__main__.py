"""`python -m service`: run the server on HOST:PORT from the settings."""

import uvicorn

from service.app import configure_logging, create_app
from service.config import load_settings


def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    # log_config=None: uvicorn's loggers keep configure_logging's handler (LOG_FORMAT, request ids).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=None, log_config=None)


if __name__ == "__main__":
    main()
