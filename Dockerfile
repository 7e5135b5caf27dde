FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY coordinator coordinator
COPY workers workers
COPY mixin mixin
COPY ops ops
RUN pip install --no-cache-dir . && useradd --create-home sidecar
USER sidecar
# worker and beat log at SIDECAR_LOG_LEVEL (no -l flag, so the environment decides)
ENV SIDECAR_LOG_LEVEL=info
CMD ["celery", "-A", "workers", "worker", "-n", "router@%h"]
