# gradwatch in a container. PyTorch comes from PyPI's default wheel (CUDA on
# x86_64); run with GPU access through docker compose (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/gradwatch

COPY pyproject.toml README.md ./
COPY app ./app
COPY trainer ./trainer
RUN pip install .

RUN useradd --create-home --uid 1000 gradwatch && mkdir -p /data && chown gradwatch /data
USER gradwatch
VOLUME ["/data"]

# Inside a container the server must listen on all interfaces to be reachable,
# which gradwatch allows only with an access token: pass GRADWATCH_TOKEN (32+
# random characters), or override the command with `--token generate` to have
# one printed. Publish the port on the host's loopback unless you mean to share it.
ENV GRADWATCH_DATA_DIR=/data
EXPOSE 8000
ENTRYPOINT ["gradwatch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
