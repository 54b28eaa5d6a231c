# gradwatch in a container. PyTorch comes from PyPI's default wheel (CUDA on
# x86_64); run with GPU access through docker compose (see docker-compose.yml).

# The browser libraries from the npm registry (htmx, pinned by package-lock.json):
# no third-party file is committed, and the app serves them itself.
FROM node:20-slim AS assets
WORKDIR /assets
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/gradwatch

COPY pyproject.toml README.md ./
COPY app ./app
COPY trainer ./trainer
# Editable, so that the app finds templates/, static/ and node_modules/ where it
# looks for them: beside its package, in /opt/gradwatch.
RUN pip install -e .
COPY templates ./templates
COPY static ./static
COPY --from=assets /assets/node_modules ./node_modules

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
