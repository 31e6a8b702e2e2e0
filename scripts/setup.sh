#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv with libtorch and ONNX Runtime from PyPI, then
# builds the workspace. Safe to run again: it only does what is not done yet.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\033[1m[setup %s]\033[0m %s\n' "$(date +%T)" "$*" >&2; }

command -v cargo >/dev/null || { say "cargo not found: install Rust (rustup) first"; exit 1; }
py=${PYTHON:-python3}
command -v "$py" >/dev/null || { say "python3 not found: install Python 3.10 or later"; exit 1; }

# Gloo's headers, for compiling mae-train's distributed shim against libtorch's c10d.
if [ ! -f /usr/include/gloo/config.h ]; then
  say "installing Debian's libgloo-dev (headers for the distributed shim)"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_ apt-get install -y -qq libgloo-dev >/dev/null 2>&1 \
    || { $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq libgloo-dev >/dev/null; }
fi

# The DICOM node's tests run against the reference components: Orthanc as the PACS, dcmtk's
# echoscu/storescu as modalities and dicom3tools' dciodvfy as the validator. Each test starts
# its own Orthanc on free ports, so the package's own service is not wanted.
if ! command -v Orthanc >/dev/null || ! command -v storescu >/dev/null \
    || ! command -v dciodvfy >/dev/null \
    || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  say "installing Debian's dcmtk, orthanc, orthanc-dicomweb and dicom3tools (for the DICOM node tests)"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_ apt-get install -y -qq dcmtk orthanc orthanc-dicomweb dicom3tools >/dev/null 2>&1 \
    || { $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq dcmtk orthanc orthanc-dicomweb dicom3tools >/dev/null; }
  if command -v systemctl >/dev/null && systemctl is-enabled orthanc >/dev/null 2>&1; then
    $sudo_ systemctl disable --now orthanc >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/orthanc ]; then
    $sudo_ /etc/init.d/orthanc stop >/dev/null 2>&1 || true
  fi
fi

venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtualenv $venv"
  "$py" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing requirements.txt into $venv (torch is large: a few GB)"
  # The virtualenv takes about 6 GB, and the test build several more: say so up front when
  # the disk holds less than 10 GB, so that a failed install is read for what it is.
  free_kb=$(df -Pk "$root" | awk 'NR == 2 { print $4 }')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
    say "warning: only $((free_kb / 1024 / 1024)) GB free on $(df -P "$root" | awk 'NR == 2 { print $6 }');" \
      "the virtualenv alone takes about 6 GB and the test build several more"
  fi
  "$venv/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
  "$venv/bin/python" -m pip install --quiet --no-cache-dir -r requirements.txt
  echo "$want" > "$stamp"
fi

# tch finds libtorch through LIBTORCH=.venv/libtorch (set in .cargo/config.toml).
torch_dir=$("$venv/bin/python" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("torch")
print(os.path.dirname(spec.origin))
PY
)
ln -sfn "$torch_dir" "$venv/libtorch"

if [ "${MAE_SETUP_NO_BUILD:-0}" != 1 ]; then
  say "building the workspace (the first build compiles libtorch bindings: several minutes)"
  # MAE_SETUP_TARGETS=--all-targets builds the tests too, with the same dependency features as
  # `cargo test` (dev-dependencies change some features; one build then serves both).
  cargo build --workspace ${MAE_SETUP_TARGETS:---bins}
fi
say "ready: binaries in $root/target/debug (mae-train, mae-export, mae-run)"
