# syntax=docker/dockerfile:1
# metaloop's container image: the `metaloop` binary, libtorch 2.11.0 built for CUDA 13.0 (the
# PyPI wheel torch==2.11.0 with its nvidia-* CUDA wheels), and the bundled configs/ and data/
# under /opt/metaloop. The same image runs the coordinator and the workers, on CPU or GPU nodes.
#
#   docker build -t metaloop:dev .
#
# Not built here: the machine this was written on has no Docker engine (docs/kubernetes.md,
# "What was tried here and what was not"). The image is large (about 4 GB: libtorch 1 GB,
# CUDA libraries 2.7 GB); GPU nodes need an NVIDIA driver of the 580 series or newer for CUDA 13.0.

ARG TORCH_VERSION=2.11.0

# --- 1. libtorch: the PyPI wheel, at a fixed path -------------------------------------------
# The binary embeds the libtorch directory it was linked against as an rpath (build.rs), so it
# is built against /opt/torch/torch/lib and the runtime image has libtorch at the same path.
# libtorch_cuda.so finds the CUDA libraries through its own rpath ($ORIGIN/../../nvidia/...),
# so they stay next to it, in /opt/torch/nvidia. No LD_LIBRARY_PATH is needed.
FROM python:3.12-slim-bookworm AS torch
ARG TORCH_VERSION
# The wheel names NCCL only libnccl.so.2; cudarc, which the binary's multi-GPU collective uses,
# loads it as libnccl.so, from the nccl/lib directory the binary's rpath names (build.rs).
RUN pip install --no-cache-dir --disable-pip-version-check --target /opt/torch "torch==${TORCH_VERSION}" \
 && test -f /opt/torch/torch/lib/libtorch_cuda.so \
 && grep -q "cu130" /opt/torch/torch/version.py \
 && ln -s libnccl.so.2 /opt/torch/nvidia/nccl/lib/libnccl.so

# --- 2. the binary ----------------------------------------------------------------------------
# With `nccl`: libtorch's CUDA library linked (GPUs for `--devices`) and NCCL between GPUs.
FROM rust:1.95-bookworm AS build
COPY --from=torch /opt/torch /opt/torch
# As ./dev does: torch-sys links the libtorch at $LIBTORCH (C++11 ABI, like the wheel).
ENV LIBTORCH=/opt/torch/torch
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin metaloop --features nccl \
 && cp target/release/metaloop /usr/local/bin/metaloop

# --- 3. runtime -------------------------------------------------------------------------------
# Same Debian release as the build stage (glibc). Besides libtorch, the binary and libtorch need
# only glibc, libstdc++ and libgcc_s, which the slim image has; libcuda.so.1 comes from the
# node's NVIDIA driver, mounted by the NVIDIA container runtime on GPU nodes.
FROM debian:bookworm-slim AS runtime
RUN groupadd --gid 10001 metaloop \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin metaloop
# Only the shared libraries: libtorch's lib/ and the CUDA wheels (no headers, no Python).
COPY --from=torch /opt/torch/torch/lib /opt/torch/torch/lib
COPY --from=torch /opt/torch/nvidia /opt/torch/nvidia
COPY --from=build /usr/local/bin/metaloop /usr/local/bin/metaloop
# The bundled job configs and data set; a job config in a ConfigMap names the data with
# absolute paths under /opt/metaloop/data (k8s/base/job.toml).
COPY configs /opt/metaloop/configs
COPY data /opt/metaloop/data
# The example TorchScript module configs/torchscript-cnn.toml trains.
COPY models /opt/metaloop/models
# The NVIDIA container runtime mounts the driver's libraries for these capabilities; which GPUs
# a container sees is the device plugin's business (NVIDIA_VISIBLE_DEVICES is not set here).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /opt/metaloop
# Fails the build if the binary cannot load libtorch (rpath, missing CUDA libraries) or the
# bundled data is not where the configs say.
RUN ["/usr/local/bin/metaloop", "validate", "/opt/metaloop/configs/quickstart.toml"]
ENTRYPOINT ["/usr/local/bin/metaloop"]
CMD ["--help"]
