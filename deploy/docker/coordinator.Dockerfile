# syntax=docker/dockerfile:1.7
# The coordinator image: the `endofm` binary (coordinator + user CLI) on Debian slim.
# The coordinator never links libtorch, FFmpeg or CUDA: the image is small and runs anywhere.
#
# Build from the repository root (the build context is the whole workspace):
#   docker build -f deploy/docker/coordinator.Dockerfile -t endofm-coordinator:latest .
# Run (what deploy/k8s does):
#   docker run -p 7070:7070 -p 9090:9090 -v endofm-state:/var/lib/endofm endofm-coordinator

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole workspace: cargo needs every member's manifest to load it, even when it builds one
# package. .dockerignore keeps target/, the venvs and caches out of the context.
COPY . .
# protoc comes vendored (protoc-bin-vendored): no system protobuf needed. The cache mounts keep
# the crates.io downloads and the target folder between builds; the binary is copied out of the
# cached target folder in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p endofm --bin endofm \
 && install -m 0755 target/release/endofm /usr/local/bin/endofm \
 # An architecture invariant, checked where it matters: no libtorch in the coordinator.
 && if ldd /usr/local/bin/endofm | grep -Eq 'torch|libc10|libav'; then \
        echo "endofm links libtorch or FFmpeg: the coordinator must not" >&2; exit 1; \
    fi

# --- runtime -------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: TLS to object stores (the coordinator reads job outputs to resume from).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid/gid, matching the pods' securityContext (runAsUser/fsGroup 10001).
RUN groupadd --gid 10001 endofm \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/endofm --no-create-home \
        --shell /usr/sbin/nologin endofm \
 && mkdir -p /var/lib/endofm \
 && chown endofm:endofm /var/lib/endofm
COPY --from=build /usr/local/bin/endofm /usr/local/bin/endofm
USER 10001:10001
# The job store (redb): mount a persistent volume here.
WORKDIR /var/lib/endofm
# 7070: gRPC (endofm.v1, grpc.health.v1, reflection); 9090: Prometheus /metrics.
EXPOSE 7070 9090
ENTRYPOINT ["endofm"]
CMD ["coordinator", "--listen", "0.0.0.0:7070", "--metrics-listen", "0.0.0.0:9090", \
     "--state", "/var/lib/endofm"]
