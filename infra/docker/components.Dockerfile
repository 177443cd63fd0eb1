# The components image: the project installed on TensorFlow, the image every Kubeflow step runs.
#   GPU (default):  docker build -f infra/docker/components.Dockerfile -t imgpipe-components .
#   CPU:            docker build -f infra/docker/components.Dockerfile \
#                     --build-arg BASE=tensorflow/tensorflow:2.21.0 -t imgpipe-components:cpu .
ARG BASE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    TF_CPP_MIN_LOG_LEVEL=2

# Behind a TLS-intercepting proxy whose CA is in the base image's trust store:
# --build-arg UV_SYSTEM_CERTS=1 (uv trusts its bundled roots otherwise).
ARG UV_SYSTEM_CERTS=

WORKDIR /opt/imgpipe
# Dependencies first (a layer that changes only with the pins), then the code.
COPY pyproject.toml requirements.lock ./
COPY components/ components/
COPY imgpipe/ imgpipe/
COPY pipelines/ pipelines/
COPY commands/ commands/
COPY serving/ serving/
COPY params.yaml dvc.yaml ./
# A venv that sees the base's site-packages (on the TensorFlow images the preinstalled
# tensorflow satisfies the pin), filled by the same pinned uv as `make setup`, from the lock;
# compiled to bytecode, which PYTHONDONTWRITEBYTECODE would otherwise make every step redo.
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/python -m pip install "uv==0.13.8" \
    && /opt/venv/bin/uv pip install --compile-bytecode --python /opt/venv/bin/python -c requirements.lock . \
    && /opt/venv/bin/python -m pip uninstall -y uv \
    && /opt/venv/bin/python -c "import commands, components, imgpipe, pipelines, serving"
ENV PATH=/opt/venv/bin:$PATH

# Run as an unprivileged user; the working directory is the only writable place it needs.
RUN useradd --create-home --uid 10001 --user-group imgpipe \
    && mkdir -p /work && chown imgpipe:imgpipe /work
USER 10001:10001
WORKDIR /work
CMD ["imgpipe", "--help"]
