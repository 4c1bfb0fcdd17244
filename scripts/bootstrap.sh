#!/usr/bin/env bash
# Set up everything glioforecast needs on a fresh Debian machine:
#   - Debian packages (dcmtk, dicom3tools, dcm2niix, orthanc and its DICOMweb plugin, rsyslog
#     with TLS, prometheus for promtool, openjph-tools, python3-venv)
#     when missing and root;
#   - a virtual environment in $VENV (default .venv) with torch==2.13.0 installed first
#     (so no CUDA build is pulled in), then the package with the requested extras.
# Usage: scripts/bootstrap.sh [EXTRAS]     e.g. scripts/bootstrap.sh test,dev
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-}
PYTHON=${PYTHON:-python3}

need_pkgs=()
command -v /usr/bin/storescu >/dev/null 2>&1 || need_pkgs+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need_pkgs+=(dicom3tools)
command -v dcm2niix >/dev/null 2>&1 || need_pkgs+=(dcm2niix)
command -v Orthanc >/dev/null 2>&1 || need_pkgs+=(orthanc)
# Orthanc's DICOMweb plugin: the STOW-RS destination of the DICOMweb tests
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_pkgs+=(orthanc-dicomweb)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
# the audit record repository of the audit trail's tests (syslog over TLS and UDP)
command -v rsyslogd >/dev/null 2>&1 || need_pkgs+=(rsyslog)
compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null || need_pkgs+=(rsyslog-gnutls)
# OpenJPH's ojph_compress: makes the HTJ2K (High-Throughput JPEG 2000) series of the tests
command -v ojph_compress >/dev/null 2>&1 || need_pkgs+=(openjph-tools)
# promtool (in Debian's prometheus package): checks /metrics and the alert rules
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # orthanc's, rsyslog's and prometheus' packages start system services; we only need the
    # binaries.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
  else
    echo "bootstrap: missing Debian packages (${need_pkgs[*]}); not root, so tests needing them skip" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp="$VENV/.glioforecast-installed-${EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  # torch first, pinned: an unpinned torch pulls several GB of CUDA packages.
  "${PIP[@]}" install torch==2.13.0
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  "${PIP[@]}" install -e "$spec"
  touch "$stamp"
fi
