# The MLflow tracking server with its basic-auth app, for infra/k8s/base/mlflow.yaml. MLflow's own
# image has neither Flask-WTF (the auth app refuses to start without it) nor a Postgres driver;
# this one installs the server from mlflow-server.lock, every package pinned.
ARG BASE=python:3.11.14-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY infra/docker/mlflow-server.lock /tmp/mlflow-server.lock
RUN python -m pip install --no-deps -r /tmp/mlflow-server.lock \
    && python -c "import boto3, flask_wtf, mlflow, psycopg2" \
    && rm /tmp/mlflow-server.lock \
    && useradd --no-create-home --uid 10001 --user-group mlflow
USER 10001:10001
EXPOSE 5000
