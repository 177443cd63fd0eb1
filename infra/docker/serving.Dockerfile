# TF Serving with the project's configs baked in; the model arrives at /models through the
# init container in infra/k8s (`imgpipe fetch-model`: the registry's champion) or a volume.
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
