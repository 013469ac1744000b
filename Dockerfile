# syntax=docker/dockerfile:1.7
#
# baton's Lambda image: one binary that is coordinator and worker (the event selects the role),
# on AWS's OS-only runtime image public.ecr.aws/lambda/provided:al2023.
#
#   docker buildx build --provenance=false -t baton .                              # arm64 (default)
#   docker buildx build --provenance=false --build-arg PLATFORM=linux/amd64 -t baton .  # x86_64
#
# The architecture is the build argument PLATFORM, not Buildx's `--platform`: the FROM lines name
# it, so `--platform linux/amd64` alone still builds arm64 (say both, or only PLATFORM).
# `--provenance=false`: Lambda rejects an OCI image index, which Buildx's provenance attestation
# makes. The function's `Architectures` (deploy/template.yaml, parameter Architecture) must match
# the platform. Building for another platform than the host's runs the compiler under QEMU,
# which is slow: CI builds arm64 on an arm64 runner.
#
# Stages: toolchain (Rust on Amazon Linux 2023, so the binary links against AL2023's own glibc,
# 2.34) -> planner (cargo-chef's recipe: the dependency graph only) -> build (dependencies
# first, in a layer that changes only with Cargo.lock; then baton itself, with
# scripts/build-bootstrap, the same script the tests run) -> the runtime image.
#
# An OpenTelemetry collector as a Lambda extension (container images cannot use layers): unpack
# the collector layer's zip into deploy/opt/ before building, so that its `extensions/` and
# `collector-config/` land under /opt (see README.md, "Deploy"). deploy/opt/ holds only `.keep`
# otherwise.

# checkov:skip=CKV_DOCKER_2:Lambda never runs a HEALTHCHECK; a sandbox that cannot start fails its init, which Lambda reports.
# checkov:skip=CKV_DOCKER_3:Lambda runs the image as its own unprivileged user (sbx_user), whatever USER says; the runtime base image has no other.
ARG PLATFORM=linux/arm64
ARG RUST_VERSION=1.95.0
ARG CARGO_CHEF_VERSION=0.1.78

# --platform on FROM makes arm64 the default whatever the host (Lambda's cheaper architecture);
# PLATFORM picks the other.
# hadolint ignore=DL3029
FROM --platform=${PLATFORM} public.ecr.aws/amazonlinux/amazonlinux:2023 AS toolchain
ARG RUST_VERSION
ARG CARGO_CHEF_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# AL2023's repositories are locked to the release of the image, so these versions are fixed by
# the base image's tag; gcc builds the C in rusqlite (SQLite) and aws-lc-sys.
# hadolint ignore=DL3041
RUN dnf install -y --setopt=install_weak_deps=False gcc make tar gzip && dnf clean all
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
    && cargo install --locked cargo-chef --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM toolchain AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM toolchain AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin baton
COPY . .
RUN scripts/build-bootstrap /out/bootstrap

# hadolint ignore=DL3029
FROM --platform=${PLATFORM} public.ecr.aws/lambda/provided:al2023
# The runtime's entry point (/lambda-entrypoint.sh) runs /var/runtime/bootstrap: baton in
# Lambda mode (AWS_LAMBDA_RUNTIME_API is set by Lambda). The job file and its templates live in
# the task root, where BATON_CONFIG points by default.
COPY --from=build /out/bootstrap /var/runtime/bootstrap
COPY deploy/job/ /var/task/
COPY deploy/opt/ /opt/
ENV BATON_CONFIG=/var/task/baton.toml
ARG PLATFORM
LABEL org.opencontainers.image.title="baton" org.opencontainers.image.description="baton's Lambda image (${PLATFORM})"
# Lambda starts the image as its own user; the handler name is unused by a custom runtime.
CMD ["baton"]
