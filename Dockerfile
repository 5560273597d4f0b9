# CPU image with loradeploy and every extra (ONNX Runtime, llama.cpp via llama-cpp-python,
# bitsandbytes). llama-cpp-python compiles llama.cpp: the build tools below are for it.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loradeploy
COPY pyproject.toml constraints.txt README.md ./
COPY loradeploy ./loradeploy
COPY targets ./targets

# torch first, from the CPU index: a bare `torch` requirement would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt ".[all]"

ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["loradeploy"]
CMD ["--help"]
