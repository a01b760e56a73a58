# The text-generation service, as two images of one file (`--target`). Model weights are never in
# either: docker-compose.yml's model-init service puts them into a volume mounted at /models.
#   tf      TensorFlow: downloads and converts the weights (model-init), serves with BACKEND=tf
#   litert  the default (last stage): serves the converted LiteRT model, with no TensorFlow

# A fixed UID (overridable at build time) makes file ownership on volumes predictable; declared
# before the first stage so that every stage can import it.
ARG UID=10001

# Slim Debian with CPython 3.10, the version the requirements are pinned for.
FROM python:3.10-slim AS base

# No .pyc files written at run time, and logs reach `docker logs` unbuffered.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The venv's bin/ first on PATH makes `python` and `pip` the venv's in every later step.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A venv behaves the same on any Debian-based Python image, including one whose system Python
# refuses `pip install` (PEP 668), so this file also builds unchanged on such a base.
RUN python3 -m venv "$VIRTUAL_ENV"

# The build-wide UID, for the user made below.
ARG UID

# The non-root user; /models and /cache belong to it because an empty named volume takes the
# ownership of the directory it is mounted on: model-init writes the weights to /models, the
# TensorFlow API its compiled programs to /cache.
RUN groupadd --gid "${UID}" app \
    && useradd --uid "${UID}" --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
    && install -d -o app -g app /models /cache

# `python -m service` and scripts/ resolve from here.
WORKDIR /app

# Serving with LiteRT needs only these pins; both images share this layer.
COPY requirements-litert.txt ./

# Requirements before code, so a code change reinstalls nothing.
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements-litert.txt

# Listen on every interface of the container (compose decides what the host publishes), find
# the model in the volume, and keep huggingface_hub's files where the user may write.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_DIR=/models/model \
    HF_HOME=/tmp/huggingface

# Documents the port the service listens on by default.
EXPOSE 8000

# Exec form: the service is PID 1 and gets SIGTERM itself, for a graceful shutdown.
CMD ["python", "-m", "service"]


# ---- kernel: the KVAttention op's C kernel (service/engine/native/), for both images -----------
FROM base AS kernel

# slim has no C compiler: zig's clang, pinned from PyPI, in this stage only. `cc` runs it for the
# generic CPU of the machine's architecture (not -march=native: the image runs elsewhere; the
# kernel picks its AVX2 path at run time).
RUN pip install --no-cache-dir --disable-pip-version-check ziglang==0.13.0.post1 \
    && printf "#!/bin/sh\nexec python -m ziglang cc -target %s-linux-gnu \"\$@\"\n" "$(uname -m)" >/usr/local/bin/cc \
    && chmod 755 /usr/local/bin/cc

# The kernel's source and its build script alone.
COPY service/engine/native/ ./native/

# Builds /app/native/libkvattn.so.
RUN python native/build.py


# ---- tf: TensorFlow on top, for model-init (download, convert) and BACKEND=tf -------------------
FROM base AS tf

# The TensorFlow pins; requirements.txt starts with `-r requirements-litert.txt`, copied above.
COPY requirements.txt requirements-nodeps.txt ./

# tf-keras goes in with --no-deps, or pip pulls a second, full TensorFlow beside tensorflow-cpu.
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt \
    && pip install --no-cache-dir --disable-pip-version-check --no-deps -r requirements-nodeps.txt

# The service itself (its TensorFlow backend and the converter's graph live in it).
COPY service/ ./service/

# The converter's quality gate decodes through the LiteRT backend, whose attention is this kernel.
COPY --from=kernel /app/native/libkvattn.so ./service/engine/native/

# What model-init runs from this image: fetch the weights, then convert them to LiteRT.
COPY scripts/download_model.py scripts/convert_model.py ./scripts/

# When the API runs this image, it is to serve with TensorFlow.
ENV BACKEND=tf

# The build-wide UID, for USER below.
ARG UID

# Everything from here on runs without root; numeric, so a runtime can verify it is not root.
USER ${UID}:${UID}

# /health answers 200 only once warm-up has compiled every XLA shape (about a minute for
# DistilGPT2 on 2 cores); slim has no curl, and urllib raises on the 503 sent until then.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]


# ---- litert: the serving image, the default target ---------------------------------------------
FROM base AS litert

# The service alone: its TensorFlow backend is never imported here, and no script is needed.
COPY service/ ./service/

# The decode program's attention kernel (the KVAttention custom op), built above.
COPY --from=kernel /app/native/libkvattn.so ./service/engine/native/

# Serve the LiteRT files model-init wrote: `auto` would fall back to TensorFlow, absent here.
ENV BACKEND=litert

# The build-wide UID, for USER below.
ARG UID

# Everything from here on runs without root; numeric, so a runtime can verify it is not root.
USER ${UID}:${UID}

# LiteRT has nothing to compile: loading, checking the files' sha256 and a warm-up call take
# seconds, so a minute of grace is plenty; slim has no curl, and urllib raises on a 503.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
