#!/usr/bin/env bash
# Install surgeond on a Jetson host (JetPack 5 / L4T R35; JetPack 6 works the same way) as a
# systemd service. Run from a checkout, as root:
#
#   sudo deploy/install-jetson.sh [csi|usb|rtsp]       # which example config to start from
#
# What it does, in order (docs/DEPLOY.md explains each step):
#   1. checks: Jetson, Python >= 3.8, NVIDIA's torch importable by the system Python, OpenCV
#      with GStreamer;
#   2. the system user `surgeon` (groups: surgeon, video);
#   3. a venv in $PREFIX made with --system-site-packages, so NVIDIA's torch and the system
#      OpenCV stay visible, and the daemon installed under a constraints file pinned to what the
#      system already has: pip can never replace torch, torchvision, numpy or OpenCV;
#   4. /etc/surgeon/surgeond.yaml from the chosen example (an existing one is kept);
#   5. the unit, enabled (START=1 also starts it), and `surgeond doctor` as the service user.
#
# Environment: PREFIX (/opt/surgeon), PYTHON (/usr/bin/python3), START (0), FORCE (1 installs
# off a Jetson), DRY_RUN (1 prints the commands instead of running them).
set -euo pipefail

CONFIG_NAME=${1:-csi}
PREFIX=${PREFIX:-/opt/surgeon}
PYTHON=${PYTHON:-/usr/bin/python3}
START=${START:-0}
FORCE=${FORCE:-0}
DRY_RUN=${DRY_RUN:-0}
SERVICE_USER=surgeon
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONSTRAINTS="$PREFIX/constraints.txt"

say() { printf '==> %s\n' "$*"; }
die() { printf 'install-jetson: %s\n' "$*" >&2; exit 1; }
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}

check_host() {
    [ -f "$SRC/deploy/configs/$CONFIG_NAME.yaml" ] || die "no example config '$CONFIG_NAME' (csi, usb, rtsp)"
    if [ "$DRY_RUN" != 1 ] && [ "$(id -u)" != 0 ]; then
        die "run as root (sudo): it creates a user, a venv in $PREFIX and a systemd unit"
    fi
    if [ -f /etc/nv_tegra_release ]; then
        say "L4T: $(head -n 1 /etc/nv_tegra_release)"
    elif [ "$FORCE" != 1 ] && [ "$DRY_RUN" != 1 ]; then
        die "/etc/nv_tegra_release is missing: not a Jetson (FORCE=1 installs anyway)"
    fi
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)' \
        || die "$PYTHON is older than 3.8"
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        local version
        version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        die "$PYTHON cannot make a venv: sudo apt install python$version-venv"
    fi
    if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
        [ "$DRY_RUN" = 1 ] || die "$PYTHON cannot import torch: install NVIDIA's JetPack wheel first (docs/DEPLOY.md)"
    fi
    if ! "$PYTHON" -c 'import cv2, re, sys; sys.exit(0 if re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()) else 1)' 2>/dev/null; then
        say "warning: the system OpenCV is missing or has no GStreamer; csi:// and rtsp:// need it (NVIDIA's: apt install nvidia-opencv; or Ubuntu's: apt install python3-opencv)"
    fi
    if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
        say "warning: tcmalloc is not installed; the daemon falls back to glibc's malloc, whose footprint is about 4x larger (sudo apt install libtcmalloc-minimal4)"
    fi
}

make_user() {
    if ! getent group "$SERVICE_USER" >/dev/null; then
        run groupadd --system "$SERVICE_USER"
    fi
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        run useradd --system --gid "$SERVICE_USER" --groups video --home-dir /var/lib/surgeon \
            --shell /usr/sbin/nologin "$SERVICE_USER"
    else
        run usermod --append --groups video "$SERVICE_USER"
    fi
}

install_venv() {
    run mkdir -p "$PREFIX"
    run "$PYTHON" -m venv --system-site-packages "$PREFIX/venv"
    say "pinning what the system has: $CONSTRAINTS"
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ %s -m pip freeze | grep torch/torchvision/numpy/opencv > %s\n' "$PYTHON" "$CONSTRAINTS"
    else
        "$PYTHON" -m pip freeze 2>/dev/null \
            | grep -iE '^(torch|torchvision|numpy|opencv[-a-z]*)(==| @ )' >"$CONSTRAINTS" || true
    fi
    run "$PREFIX/venv/bin/pip" install --upgrade --constraint "$CONSTRAINTS" "$SRC"
}

install_config() {
    run install -d -m 0750 -o root -g "$SERVICE_USER" /etc/surgeon
    if [ -f /etc/surgeon/surgeond.yaml ]; then
        say "keeping the existing /etc/surgeon/surgeond.yaml"
    else
        run install -m 0640 -o root -g "$SERVICE_USER" "$SRC/deploy/configs/$CONFIG_NAME.yaml" \
            /etc/surgeon/surgeond.yaml
    fi
    run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" /var/lib/surgeon /var/lib/surgeon/models
    run "$PREFIX/venv/bin/surgeond" config --check /etc/surgeon/surgeond.yaml
}

install_unit() {
    run install -m 0644 "$SRC/systemd/surgeond.service" /etc/systemd/system/surgeond.service
    if [ "$PREFIX" != /opt/surgeon ]; then
        run sed -i "s|/opt/surgeon/venv|$PREFIX/venv|" /etc/systemd/system/surgeond.service
    fi
    run systemctl daemon-reload
    run systemctl enable surgeond.service
    if [ "$START" = 1 ]; then
        run systemctl start surgeond.service
    fi
}

check_host
make_user
install_venv
install_config
install_unit
# the runtime directory appears when systemd starts the unit; the state directory exists now
run runuser -u "$SERVICE_USER" -- env STATE_DIRECTORY=/var/lib/surgeon \
    "$PREFIX/venv/bin/surgeond" doctor --config /etc/surgeon/surgeond.yaml || true
say "done. Put the model weights in /var/lib/surgeon/models, then: systemctl start surgeond; surgeonctl status"
