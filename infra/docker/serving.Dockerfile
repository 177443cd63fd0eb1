# TF Serving with the project's configs baked in, for running outside Kubernetes (infra/k8s runs
# tensorflow/serving with the configs from a ConfigMap); the models arrive at /models in a volume.
# gRPC is plaintext unless given TLS: mount an SSLConfig (`python -m serving.config ssl`, never
# baked in) and append its flag, e.g. `docker run -v "$PWD/tls:/ssl:ro" imgpipe-serving
# --ssl_config_file=/ssl/ssl.config` (arguments follow the ENTRYPOINT's; REST stays plaintext).
#   GPU (default):  docker build -f infra/docker/serving.Dockerfile -t imgpipe-serving .
#   CPU:            docker build -f infra/docker/serving.Dockerfile \
#                     --build-arg BASE=tensorflow/serving:2.21.0 -t imgpipe-serving:cpu .
ARG BASE=tensorflow/serving:2.21.0-gpu
FROM ${BASE}

COPY serving/models.config serving/batching.config serving/monitoring.config /config/
RUN useradd --no-create-home --uid 10001 --user-group serving
USER 10001:10001
EXPOSE 8500 8501
ENTRYPOINT ["tensorflow_model_server", "--port=8500", "--rest_api_port=8501", \
    "--model_config_file=/config/models.config", "--model_config_file_poll_wait_seconds=60", \
    "--enable_batching", "--batching_parameters_file=/config/batching.config", \
    "--monitoring_config_file=/config/monitoring.config", \
    "--grpc_channel_arguments=grpc.max_receive_message_length=16777216", \
    "--file_system_poll_wait_seconds=30"]
