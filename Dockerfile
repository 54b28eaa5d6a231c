# gradwatch in a container: the server from the built wheel, PyTorch for CPU or CUDA. docs/deploy.md says more.
#
#   docker build -t gradwatch:cu128 .                                  # CUDA 12.8 PyTorch (the default)
#   docker build -t gradwatch:cpu --build-arg TORCH_VARIANT=cpu .       # CPU-only, a far smaller image
#   docker build -t gradwatch:ray --build-arg EXTRAS=ray .              # with Ray, for --backend ray
#
# Layers go from what changes least to what changes most: PyTorch, then the dependencies pyproject.toml lists,
# then the wheel. Editing app/ rebuilds the wheel and its one layer, never PyTorch or the other dependencies.

# The dependency list, derived from pyproject.toml alone (plus the extras asked for), so that the layer installing
# it is rebuilt only when that list changes.
FROM python:3.11-slim-bookworm AS requirements
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].replace(' ', '').split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
    "$EXTRAS" > /requirements.txt

# The wheel, built as a release is: the sdist, then the wheel from it. Its build hook (hatch_build.py) fetches
# htmx from the npm registry, pinned by package-lock.json, and puts it in the wheel with templates/ and static/.
FROM node:20-bookworm-slim AS wheel
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --no-cache-dir build==1.6.1
WORKDIR /src
COPY pyproject.toml hatch_build.py README.md package.json package-lock.json ./
COPY app ./app
COPY trainer ./trainer
COPY gradwatch ./gradwatch
COPY templates ./templates
COPY static ./static
RUN /opt/build/bin/python -m build --outdir /dist .

FROM python:3.11-slim-bookworm
# PyTorch's own index: cpu, or a CUDA build (cu126, cu128, cu130: whichever pytorch.org lists for the version
# and the host's NVIDIA driver supports).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"
# The rest of the dependencies from PyPI; torch is already there, and pinned so that nothing replaces it.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}"
# The wheel itself: its dependencies are all installed above.
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/gradwatch-*.whl

# Not root: uid and gid 1000 by number, which Kubernetes' runAsNonRoot can check.
RUN groupadd --gid 1000 gradwatch && useradd --create-home --uid 1000 --gid 1000 gradwatch \
    && mkdir -p /data && chown 1000:1000 /data
USER 1000:1000
WORKDIR /home/gradwatch
VOLUME ["/data"]

# Inside a container the server must listen on all interfaces to be reachable,
# which gradwatch allows only with an access token: pass GRADWATCH_TOKEN (32+
# random characters), or override the command with `--token generate` to have
# one printed. Publish the port on the host's loopback unless you mean to share it.
ENV GRADWATCH_DATA_DIR=/data
EXPOSE 8000
# /healthz needs no token and says nothing but {"status":"ok"}; the slim image has no curl, so Python asks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["gradwatch"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
