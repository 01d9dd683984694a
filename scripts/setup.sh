#!/usr/bin/env bash
# One-time (idempotent, cached) set-up of a fresh Debian machine for endofm:
#   - Debian packages the build and tests need (installed only when missing);
#   - a project-local venv `.venv` with libtorch 2.13.0 from the PyPI torch wheel (re-installed
#     only when scripts/requirements.txt changes);
#   - `.libtorch`, a link to the venv's torch package, which .cargo/config.toml points tch at,
#     so plain `cargo build` / `cargo test` work in the repository root afterwards;
#   - moto, a real S3 server for the object-storage tests, in its own venv `.cache/moto-venv`
#     (re-installed only when scripts/moto-requirements.txt changes);
#   - kubernetes-validate, which checks deploy/k8s against the Kubernetes schemas, in its own
#     venv `.cache/k8s-venv` (re-installed only when scripts/k8s-requirements.txt changes).
# A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------------------------
# binutils: readelf (tests read the binaries' dynamic sections).
# libav*-dev, libswscale-dev, clang, libclang-dev: FFmpeg 5.1 for clip encoding/decoding
# (ffmpeg-next; its bindgen build needs libclang).
# prometheus: the server and promtool (the metrics and deploy tests run both).
# curl: the tests' HTTP client (metrics scrapes, Prometheus queries). openssl: the TLS test
# makes its certificates with it.
# fonts-dejavu-core: DejaVu Sans, the font report plots draw their text with (eval::plots).
debs=(binutils pkg-config libavcodec-dev libavformat-dev libavutil-dev libswscale-dev clang libclang-dev prometheus curl openssl fonts-dejavu-core)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python venv with libtorch ------------------------------------------------------------
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=.venv/.endofm-requirements
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing scripts/requirements.txt into .venv (torch wheel with CUDA libraries, ~5 GB, a few minutes)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
version=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$site/torch/version.py")
case "$version" in
  2.13.0*) ;;
  *) log "error: .venv has torch $version, endofm needs 2.13.0 (delete .venv and rerun)"; exit 1 ;;
esac
ln -sfn "${site#"$root"/}/torch" .libtorch

# cudarc looks for libnccl.so, the wheel ships libnccl.so.2 only.
nccl="$site/nvidia/nccl/lib"
if [ -e "$nccl/libnccl.so.2" ] && [ ! -e "$nccl/libnccl.so" ]; then
  ln -s libnccl.so.2 "$nccl/libnccl.so"
fi

# --- Test tools in their own venvs (they must not touch .venv's torch) ----------------------
# tool_venv DIR REQUIREMENTS BINARY WHAT: creates DIR, (re)installs REQUIREMENTS when they changed
# or BINARY is missing.
tool_venv() {
  local dir=$1 reqs=$2 binary=$3 what=$4
  if [ ! -x "$dir/bin/python" ]; then
    log "creating $dir"
    mkdir -p "$(dirname "$dir")"
    "$py" -m venv "$dir"
  fi
  local stamp=$dir/.endofm-requirements want
  want=$(sha256sum "$reqs" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$dir/bin/$binary" ]; then
    log "installing $reqs into $dir ($what)"
    "$dir/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
    echo "$want" > "$stamp"
  fi
}
moto=.cache/moto-venv
tool_venv "$moto" scripts/moto-requirements.txt moto_server "S3 server for the tests"
k8s=.cache/k8s-venv
tool_venv "$k8s" scripts/k8s-requirements.txt kubernetes-validate "Kubernetes manifest validation"
# kubectl (for `kubectl kustomize`) comes with this machine kind. Debian's kubernetes-client
# (1.20) embeds kustomize 2.0, too old for deploy/k8s, so it is not installed as a fallback.
# Without kubectl the deploy test fails unless ENDOFM_SKIP_K8S=1.
command -v kubectl >/dev/null || log "warning: kubectl not found: the deploy test needs it (or ENDOFM_SKIP_K8S=1)"

log "ready: libtorch $version at .libtorch, moto at $moto/bin/moto_server, kubernetes-validate at $k8s/bin"
