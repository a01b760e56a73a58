# The text-generation service on CPU-only TensorFlow. Model weights are never in the image:
# compose.yaml's model-init service puts them into a volume mounted at /models.

# Slim Debian with CPython 3.10, the version requirements.txt is pinned for.
FROM python:3.10-slim

# No .pyc files written at run time, and logs reach `docker logs` unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The venv's bin/ first on PATH makes `python` and `pip` the venv's in every later step.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A venv behaves the same on any Debian-based Python image, including one whose system Python
# refuses `pip install` (PEP 668), so this file also builds unchanged on such a base.
RUN python3 -m venv "$VIRTUAL_ENV"

# A fixed UID (overridable at build time) makes file ownership on volumes predictable.
ARG UID=10001

# The non-root user; /models and /cache belong to it because an empty named volume takes the
# ownership of the directory it is mounted on: model-init writes the weights to /models, the
# API its compiled programs to /cache.
RUN groupadd --gid "${UID}" app \
    && useradd --uid "${UID}" --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
    && install -d -o app -g app /models /cache

# `python -m service` and scripts/ resolve from here.
WORKDIR /app

# The pinned requirements alone first, so a code change does not reinstall TensorFlow.
COPY requirements.txt requirements-nodeps.txt ./

# tf-keras goes in with --no-deps, or pip pulls a second, full TensorFlow beside tensorflow-cpu.
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt \
    && pip install --no-cache-dir --disable-pip-version-check --no-deps -r requirements-nodeps.txt

# The service itself.
COPY service/ ./service/

# The download script that model-init runs from this same image.
COPY scripts/download_model.py ./scripts/

# Listen on every interface of the container (compose decides what the host publishes), find
# the model in the volume, and keep huggingface_hub's files where the user may write.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_DIR=/models/model \
    HF_HOME=/tmp/huggingface

# Everything from here on runs without root; numeric, so a runtime can verify it is not root.
USER ${UID}:${UID}

# Documents the port the service listens on by default.
EXPOSE 8000

# /health answers 200 only once warm-up has compiled every shape (about 2 minutes for
# DistilGPT2 on 2 cores); slim has no curl, and urllib raises on the 503 sent until then.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

# Exec form: the service is PID 1 and gets SIGTERM itself, for a graceful shutdown.
CMD ["python", "-m", "service"]
