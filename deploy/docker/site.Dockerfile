# skin-fl hospital-site image: skin-fl-client (checks the site's setup, runs the Flower SuperNode).
# Build from the repository root:  docker build -f deploy/docker/site.Dockerfile -t skin-fl-site .
# For NVIDIA GPUs build with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# and run with --gpus all.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HOME=/state

WORKDIR /opt/skin-fl
# torch first: without it present pip would pick whatever build the project's dependencies pull.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY constraints.txt ./
# constraints.txt pins every package to the versions CI tests with (torch 2.13.0, torchvision 0.28.0);
# the extra index offers the CPU (or CUDA) build of that torch, which pip prefers to the plain one.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt torch torchvision

COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY client ./client
COPY simulation ./simulation
COPY deploy/sites/example-site.toml ./deploy/sites/example-site.toml
RUN pip install -c constraints.txt -e .

# /data: the site's images (read-only); /state: node config and SuperNode log; /cache: decoded images.
RUN useradd --uid 10001 --create-home --home-dir /home/skin-fl skin-fl \
    && mkdir -p /state /cache && chown skin-fl /state /cache
USER skin-fl
VOLUME ["/state", "/cache"]

ENTRYPOINT ["skin-fl-client"]
CMD ["--config", "/config/site.toml"]
