# syntax=docker/dockerfile:1.7
# The worker image: `endofm-worker` linked against libtorch 2.13.0 from the PyPI torch wheel
# (CUDA 13 build), exactly as scripts/setup.sh does on a developer machine, with the wheel's
# CUDA libraries (nvidia/*/lib: cudart, cuBLAS, cuDNN, NCCL, ...) and Debian's FFmpeg 5.1.
# The GPU driver (libcuda.so) is not in the image: the NVIDIA container toolkit mounts the
# host's. The same image runs CPU-only workers (`--devices cpu:N`).
#
# Build from the repository root (downloads ~5 GB of wheels; the image is ~6 GB):
#   docker build -f deploy/docker/worker.Dockerfile -t endofm-worker:latest .
#
# Licences: the image redistributes NVIDIA's CUDA libraries (NVIDIA's licences) and Debian's
# FFmpeg, which is built with GPL components: see deploy/README.md before publishing it.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# FFmpeg headers (ffmpeg-next; its bindgen step needs libclang) and Python for the torch wheel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv pkg-config \
        libavcodec-dev libavformat-dev libavutil-dev libswscale-dev clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*

# libtorch = the torch wheel's package folder, in a venv at the SAME path as in the runtime
# image: the worker's build script (worker/build.rs) bakes absolute rpaths to
# <venv>/.../torch/lib and every <venv>/.../nvidia/*/lib, and the path of <venv>/bin/python
# (the checkpoint converter), into the binary; no LD_LIBRARY_PATH is needed at run time.
ENV ENDOFM_VENV=/opt/endofm/venv
COPY scripts/requirements.txt /tmp/requirements.txt
# requirements.txt pins torch==2.13.0 (tch 0.26 needs exactly that libtorch).
RUN python3 -m venv "$ENDOFM_VENV" \
 && "$ENDOFM_VENV/bin/pip" install --no-cache-dir --disable-pip-version-check \
        -r /tmp/requirements.txt \
 && site=$("$ENDOFM_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && ln -sfn "$site/torch" /opt/endofm/libtorch \
 # cudarc opens libnccl.so, the wheel ships only libnccl.so.2.
 && ln -sfn libnccl.so.2 "$site/nvidia/nccl/lib/libnccl.so"

WORKDIR /src
COPY . .
# LIBTORCH from the environment overrides .cargo/config.toml's `.libtorch` (cargo's [env] does
# not override variables already set); torch-sys then skips its version check and
# worker/build.rs checks for 2.13.0 instead.
ENV LIBTORCH=/opt/endofm/libtorch \
    LIBTORCH_CXX11_ABI=1
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p endofm-worker --bin endofm-worker \
 && install -m 0755 target/release/endofm-worker /usr/local/bin/endofm-worker \
 # libtorch_cuda must be NEEDED (else CUDA is silently unavailable) and found via the RUNPATH.
 && readelf -d /usr/local/bin/endofm-worker | grep -q 'NEEDED.*libtorch_cuda.so' \
 && readelf -d /usr/local/bin/endofm-worker | grep -q 'RUNPATH.*/opt/endofm/venv/'

# --- runtime -------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
# FFmpeg 5.1 runtime libraries (the sonames the binary was linked against), python3 for the
# venv's interpreter (the same Debian python the venv was made with), CA certificates for TLS to
# object stores.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        ca-certificates python3 \
        libavcodec59 libavformat59 libavutil57 libswscale6 \
 && rm -rf /var/lib/apt/lists/*
# The venv carries torch/lib (libtorch) and nvidia/*/lib (CUDA runtime, cuBLAS, cuDNN, NCCL...):
# the rpaths baked into the binary point here. Its python runs the .pth checkpoint converter.
COPY --from=build /opt/endofm/venv /opt/endofm/venv
# COPY keeps symlinks, but make sure of the libnccl.so one: without it cudarc finds no NCCL.
RUN for lib in /opt/endofm/venv/lib/python3*/site-packages/nvidia/nccl/lib; do \
        ln -sfn libnccl.so.2 "$lib/libnccl.so"; \
    done
COPY --from=build /usr/local/bin/endofm-worker /usr/local/bin/endofm-worker
# Every library resolves (libcuda is loaded lazily, from the driver the toolkit mounts).
RUN if ldd /usr/local/bin/endofm-worker | grep 'not found'; then exit 1; fi
RUN groupadd --gid 10001 endofm \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/endofm \
        --shell /usr/sbin/nologin endofm
USER 10001:10001
WORKDIR /home/endofm
# Ask the NVIDIA container runtime for the GPUs and the compute driver libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# 9091: Prometheus /metrics.
EXPOSE 9091
ENTRYPOINT ["endofm-worker"]
CMD ["agent", "--coordinator", "http://endofm-coordinator:7070", "--devices", "cuda", \
     "--metrics-listen", "0.0.0.0:9091"]
