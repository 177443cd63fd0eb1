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

WORKDIR /opt/imgpipe
# Dependencies first (a layer that changes only with the pins), then the code.
COPY pyproject.toml requirements.lock ./
COPY components/ components/
COPY imgpipe/ imgpipe/
COPY pipelines/ pipelines/
COPY serving/ serving/
COPY params.yaml dvc.yaml ./
RUN python -m pip install -c requirements.lock . \
    && python -c "import components, imgpipe, pipelines, serving"

# Run as an unprivileged user; the working directory is the only writable place it needs.
RUN useradd --create-home --uid 10001 --user-group imgpipe \
    && mkdir -p /work && chown imgpipe:imgpipe /work
USER 10001:10001
WORKDIR /work
CMD ["imgpipe", "--help"]
