#!/usr/bin/env bash
# Build docker/Dockerfile on a locally made base and run the tiny training inside it.
# For machines that cannot pull images: the base is a Debian rootfs from debootstrap, imported
# with `docker import`, plus CPU torch from a local package index served on 127.0.0.1.
#
#   bash docker/test_build.sh            # uses a running daemon ($DOCKER_HOST), else starts one
#
# Environment:
#   KLA_DOCKER_DIR   dockerd state, rootfs and logs (default ${TMPDIR:-/tmp}/kla-docker)
#   KLA_PIP_ROOT     folder served as the local package source (default /opt), holding
#                    pypi/simple and pypi-more/simple (PEP 503 indexes) and wheels/ (find-links, CPU torch);
#                    anything missing there comes from pip's default index (PyPI), as on the host
#   KLA_PYPI_PORT    port for the local index (default 18080)
#   DEBIAN_MIRROR    debootstrap mirror (default http://deb.debian.org/debian)
#   KEEP_DOCKERD=1   leave the daemon this script started running
# dockerd is started with --bridge=none --iptables=false (no docker0 network, no NAT rules);
# builds use --network host, the training container runs with --network none.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${KLA_DOCKER_DIR:-${TMPDIR:-/tmp}/kla-docker}
PIP_ROOT=${KLA_PIP_ROOT:-/opt}
PORT=${KLA_PYPI_PORT:-18080}
mkdir -p "$D"
log() { echo "[test_build $(date +%T)] $*" >&2; }

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v dockerd >/dev/null || { log "installing docker.io"; apt_install docker.io; }
command -v debootstrap >/dev/null || { log "installing debootstrap"; apt_install debootstrap; }

STARTED=""
if [ -z "${DOCKER_HOST:-}" ] || ! docker version >/dev/null 2>&1; then
  export DOCKER_HOST=unix://$D/docker.sock
  if ! docker version >/dev/null 2>&1; then
    mkdir -p "$D/data" "$D/exec"
    nohup dockerd -H "$DOCKER_HOST" --data-root "$D/data" --exec-root "$D/exec" --pidfile "$D/dockerd.pid" \
      --bridge=none --iptables=false --ip6tables=false --ip-masq=false >"$D/dockerd.log" 2>&1 &
    STARTED=1
    for _ in $(seq 150); do docker version >/dev/null 2>&1 && break; sleep 0.2; done
    docker version >/dev/null || { tail -n 20 "$D/dockerd.log" >&2; exit 1; }
    log "dockerd started ($DOCKER_HOST)"
  fi
fi

INDEX_PID=""
cleanup() {
  if [ -n "$INDEX_PID" ]; then kill "$INDEX_PID" 2>/dev/null || true; fi
  if [ -n "$STARTED" ] && [ "${KEEP_DOCKERD:-0}" != 1 ] && [ -f "$D/dockerd.pid" ]; then
    kill -TERM "$(cat "$D/dockerd.pid")" 2>/dev/null || true
  fi
}
trap cleanup EXIT

if ! docker image inspect kla-test-debian:bookworm >/dev/null 2>&1; then
  log "debootstrap bookworm (python3, pip, venv)"
  rm -rf "$D/rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$D/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$D/debootstrap.log" 2>&1
  tar -C "$D/rootfs" -c . | docker import - kla-test-debian:bookworm
  rm -rf "$D/rootfs"
fi

# A local package index, reachable from `docker build --network host` (file:// paths are not).
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$PIP_ROOT" >"$D/index.log" 2>&1 &
INDEX_PID=$!
sleep 1
log "building the test base (venv + CPU torch from the local index)"
# The base trusts the host's CA bundle, so pip reaches PyPI through the same (TLS-inspecting) proxy.
mkdir -p "$D/basectx"
cp /etc/ssl/certs/ca-certificates.crt "$D/basectx/"
docker build --network host -t kla-test-base:cpu -f - "$D/basectx" <<DOCKERFILE
FROM kla-test-debian:bookworm
COPY ca-certificates.crt /etc/ssl/certs/host-ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt
ENV PIP_EXTRA_INDEX_URL="http://127.0.0.1:$PORT/pypi/simple/ http://127.0.0.1:$PORT/pypi-more/simple/" \\
    PIP_FIND_LINKS=http://127.0.0.1:$PORT/wheels/ PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:\$PATH
RUN python3 -m venv /opt/venv && pip install torch==2.13.0 numpy
DOCKERFILE

log "building docker/Dockerfile on it"
docker build --network host --build-arg BASE=kla-test-base:cpu --build-arg EXTRAS=test \
  --build-arg USER_UID=1000 -t kla-megatron:test -f docker/Dockerfile .

log "tiny training inside the image (--network none)"
docker run --rm --network none kla-megatron:test \
  python -m kla_megatron.train --config configs/tiny_cpu.yaml --set model=kla_tiny --set data.kind=mock \
  --set checkpoint.dir=/tmp/ck --set train.steps=3 --set train.warmup_steps=1 --set train.seq_length=32 \
  --set train.micro_batch_size=2 --set train.global_batch_size=4 --set train.eval_interval=0 --set logging.interval=1
log "ok"
