# CPU image with loradeploy and every extra (ONNX Runtime, llama.cpp via llama-cpp-python,
# bitsandbytes). llama-cpp-python compiles llama.cpp: the build tools below are for it.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/loradeploy
COPY pyproject.toml constraints.txt README.md ./
COPY requirements ./requirements
COPY loradeploy ./loradeploy
COPY targets ./targets

# torch first, from the CPU index, then the lock (constraints.txt: every package at one version, hashed): a bare `torch` requirement would pull a multi-GB CUDA build.
# llama.cpp for a portable x86-64 level: a native build may use AMX, which some VMs forbid.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir --require-hashes --no-deps -r constraints.txt \
 && pip install --no-cache-dir --no-deps . && pip check

ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["loradeploy"]
CMD ["--help"]
