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

# Until the server lands (issue 3) the image trains the demo ring pair headless
# into the volume; override the command to train anything else.
ENTRYPOINT ["gradwatch"]
CMD ["train", "--preset", "ring8-saturating", "--out", "/data/runs/ring8-saturating"]
