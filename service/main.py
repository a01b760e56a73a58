"""`uvicorn service.main:app`: the app with settings from the environment.

Importing this module reads and checks the settings (a missing or incomplete MODEL_DIR exits
here with one line); the model itself loads when the server starts.
"""

from service.app import configure_logging, create_app
from service.config import load_settings

settings = load_settings()
configure_logging(settings)
app = create_app(settings)
