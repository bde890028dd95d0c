#!/usr/bin/env bash
# Prepare .whl/site: the packages benchmarks/gpu.sh needs that a bare GPU machine lacks
# (envpool, its Atari ROMs, gymnasium, ale-py and their small dependencies), for Python 3.12
# on x86-64 Linux. Run it here, where pip can download; .whl/ is git-ignored, so name it in
# the device call's `carry` and gpu.sh puts .whl/site on PYTHONPATH.
#
# The official envpool wheel (53 MB) and its asset wheels (hundreds of MB) hold every suite
# (MuJoCo, VizDoom, Procgen, ...); only Atari and classic control are kept, which brings the
# folder to a few MB, well inside the 64 MiB a device call can carry.
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${PYVER:-3.12}
SITE=${SITE:-.whl/site}
PACKAGES=(envpool==1.2.5 envpool-assets==0.3.0 ale-py==0.12.1 gymnasium==1.4.0 farama-notifications==0.0.6
          optree==0.20.0 dm-env==1.6 dm-tree==0.1.10)
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$download" "${PACKAGES[@]}"

rm -rf "$SITE"
mkdir -p "$SITE"
for wheel in "$download"/*.whl; do
  python3 -m zipfile -e "$wheel" "$SITE"  # a wheel is a zip of its installed files
done

# envpool: keep the core, Atari and classic control; register only those.
envpool=$SITE/envpool
for suite in "$envpool"/*/; do
  case "$(basename "$suite")" in
    atari|classic_control|python|__pycache__) ;;
    *) rm -rf "$suite" ;;
  esac
done
cat > "$envpool/entry.py" <<'EOF'
"""Entry point for the envs kept in this slim build (benchmarks/gpu_wheels.sh): Atari and classic control."""

import envpool.atari.registration  # noqa: F401
import envpool.classic_control.registration  # noqa: F401
EOF
# envpool_assets: the Atari ROMs only.
for assets in "$SITE"/envpool_assets/*/; do
  [ "$(basename "$assets")" = atari ] || rm -rf "$assets"
done
rm -rf "$SITE"/envpool_assets_mujoco* "$SITE"/*.dist-info/RECORD
du -sh "$SITE"
