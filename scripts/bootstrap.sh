#!/usr/bin/env bash
# Set up everything glioforecast needs on a fresh Debian machine:
#   - Debian packages (dcmtk, dicom3tools, dcm2niix, orthanc and its DICOMweb plugin, rsyslog
#     with TLS, prometheus for promtool, openjph-tools, strace, python3-venv)
#     when missing and root;
#   - a virtual environment in $VENV (default .venv) with torch==2.13.0 installed first
#     (so that no other version is pulled in; from $TORCH_INDEX_URL when set), then the
#     package with the requested extras.
# Usage: scripts/bootstrap.sh [EXTRAS]     e.g. scripts/bootstrap.sh test,dev
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${1:-}
PYTHON=${PYTHON:-python3}

# a program of a package, looked for in the system folders too (a user's PATH has no
# /usr/sbin, where Orthanc and rsyslogd are)
has() { PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

need_pkgs=()
has /usr/bin/storescu || need_pkgs+=(dcmtk)
has dciodvfy || need_pkgs+=(dicom3tools)
has dcm2niix || need_pkgs+=(dcm2niix)
has Orthanc || need_pkgs+=(orthanc)
# Orthanc's DICOMweb plugin: the STOW-RS destination of the DICOMweb tests
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_pkgs+=(orthanc-dicomweb)
has openssl || need_pkgs+=(openssl)
# the audit record repository of the audit trail's tests (syslog over TLS and UDP)
has rsyslogd || need_pkgs+=(rsyslog)
compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null || need_pkgs+=(rsyslog-gnutls)
# OpenJPH's ojph_compress: makes the HTJ2K (High-Throughput JPEG 2000) series of the tests
has ojph_compress || need_pkgs+=(openjph-tools)
# promtool (in Debian's prometheus package): checks /metrics and the alert rules
has promtool || need_pkgs+=(prometheus)
# strace: slows a restore's renames in the test of a node started during a restore
has strace || need_pkgs+=(strace)
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # wait for another apt (unattended-upgrades) rather than fail at once
    apt=(apt-get -o DPkg::Lock::Timeout=600)
    "${apt[@]}" update -qq
    # orthanc's, rsyslog's and prometheus' packages start system services; we only need the
    # binaries. A policy-rc.d of the site's own is left as it is; ours goes whatever happens.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    fi
    "${apt[@]}" install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # the servers installed here are for the tests' binaries only: not started at boot either
    for pkg in orthanc prometheus; do
      if [[ " ${need_pkgs[*]} " == *" $pkg "* ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --quiet "$pkg" >/dev/null 2>&1 || true
      fi
    done
  elif [[ " ${need_pkgs[*]} " == *" python3-venv "* ]]; then
    echo "bootstrap: $PYTHON cannot make a virtual environment (Debian's python3-venv is missing);" \
      "as root: apt-get install python3-venv ${need_pkgs[*]}" >&2
    exit 1
  else
    echo "bootstrap: missing Debian packages (${need_pkgs[*]}); not root, so tests needing them skip" >&2
  fi
fi

# a virtual environment that cannot run pip (its python gone with an upgrade, or left half made
# when python3-venv was missing) is made again
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
  [ -e "$VENV" ] && echo "bootstrap: $VENV cannot run pip: made again"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
stamp="$VENV/.glioforecast-installed-${EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  # torch first, pinned: an unpinned torch pulls several GB of CUDA packages. PyPI's Linux
  # wheel of torch 2.13.0 is itself the CUDA build: TORCH_INDEX_URL (e.g.
  # https://download.pytorch.org/whl/cpu) takes it from another index, such as the CPU one.
  torch_from=()
  [ -n "${TORCH_INDEX_URL:-}" ] && torch_from=(--index-url "$TORCH_INDEX_URL")
  "${PIP[@]}" install "${torch_from[@]}" torch==2.13.0
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  "${PIP[@]}" install -e "$spec"
  touch "$stamp"
fi
