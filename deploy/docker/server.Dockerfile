# skin-fl coordinator image: skin-fl-server (Flower SuperLink on loopback behind nginx) and skin-fl-certs.
# Build from the repository root:  docker build -f deploy/docker/server.Dockerfile -t skin-fl-server .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    SKIN_FL_SERVER_STATE=/state \
    HOME=/state

# nginx terminates TLS on the public port and forwards only the Fleet API to the SuperLink.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/skin-fl
# torch first, from the CPU wheel index: the coordinator only averages weights, and without torch
# present pip would pull a CUDA build as a dependency of the project.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY constraints.txt ./
# constraints.txt pins every package to the versions CI tests with (torch 2.13.0, torchvision 0.28.0);
# the extra index offers the CPU (or CUDA) build of that torch, which pip prefers to the plain one.
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt torch torchvision

# The server submits the Flower app from its source folder (pyproject.toml's [tool.flwr.app]), so the
# project is installed in place (editable) from /opt/skin-fl.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY coordinator ./coordinator
COPY client ./client
COPY simulation ./simulation
COPY deploy/run-config.example.toml ./deploy/run-config.example.toml
RUN pip install -c constraints.txt -e .

# Runs as an unprivileged user by default; compose passes the host user's uid so mounted keys
# (mode 600) stay readable. /state holds the SuperLink database, run folders and logs.
RUN useradd --uid 10001 --create-home --home-dir /home/skin-fl skin-fl \
    && mkdir -p /state && chown skin-fl /state
USER skin-fl
VOLUME ["/state"]
EXPOSE 9443

ENTRYPOINT ["skin-fl-server"]
CMD ["--state-dir", "/state", "start", "--credentials", "/credentials", "--host", "0.0.0.0", "--port", "9443"]
