#!/usr/bin/env bash
# Packs mae-run, a model and a hardened systemd unit into one archive for an edge machine.
#
#   scripts/package-edge.sh --model M.onnx [--ort] [--out mae-edge.tar.gz]
#
#   --model FILE    the ONNX model to serve (its SHA-256 is pinned with --expect-sha256)
#   --ort           also pack libonnxruntime.so (from ORT_DYLIB_PATH or the project
#                   virtualenv) and serve with --backend ort
#   --out FILE      the archive to write (default mae-edge.tar.gz)
#   --binary FILE   pack this mae-run instead of building a stripped release one (tests)
#
# The archive unpacks to mae-edge/: bin/mae-run, models/, lib/ (with --ort), mae-run.service,
# mae-run.env, MODEL_CARD.md, SHA256SUMS and INSTALL.md. It is written atomically (temp
# file, then rename).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf '\033[1m[package-edge]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

model="" ort=0 out="mae-edge.tar.gz" binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=${2:?--model needs a file}; shift 2 ;;
    --ort) ort=1; shift ;;
    --out) out=${2:?--out needs a file}; shift 2 ;;
    --binary) binary=${2:?--binary needs a file}; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$model" ] || die "--model FILE is required"
[ -f "$model" ] || die "model $model does not exist"
for tool in sha256sum tar; do
  command -v "$tool" >/dev/null || die "$tool is needed"
done

if [ -z "$binary" ]; then
  say "building a release mae-run"
  (cd "$root" && cargo build --release -p mae-runtime --bin mae-run)
  binary="$root/target/release/mae-run"
fi
[ -x "$binary" ] || die "mae-run binary $binary is not an executable file"

ort_lib=""
if [ "$ort" = 1 ]; then
  ort_lib=${ORT_DYLIB_PATH:-}
  if [ -z "$ort_lib" ]; then
    ort_lib=$(ls "$root"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* \
      2>/dev/null | head -n1 || true)
  fi
  [ -n "$ort_lib" ] && [ -f "$ort_lib" ] \
    || die "--ort: no libonnxruntime.so (set ORT_DYLIB_PATH or run scripts/setup.sh)"
fi

work=$(mktemp -d)
tmp_out=""
trap 'rm -rf "$work"; [ -z "$tmp_out" ] || rm -f "$tmp_out"' EXIT
b="$work/mae-edge"
mkdir -p "$b/bin" "$b/models"
cp "$binary" "$b/bin/mae-run"
if command -v strip >/dev/null; then
  strip --strip-all "$b/bin/mae-run"
else
  say "strip not found: the binary keeps its symbols"
fi
chmod 0755 "$b/bin/mae-run"
model_name=$(basename "$model")
cp "$model" "$b/models/$model_name"
[ ! -e "$model.data" ] || cp "$model.data" "$b/models/$model_name.data"
chmod 0644 "$b"/models/*
sha=$(sha256sum "$model" | cut -d' ' -f1)
# The model card, for the reviewers who approve the installation.
"$b/bin/mae-run" info --model "$b/models/$model_name" --card "$b/MODEL_CARD.md" 2>/dev/null \
  || die "cannot write the model card of $model (is it a model mae-run reads?)"

backend_args=""
if [ -n "$ort_lib" ]; then
  mkdir -p "$b/lib"
  cp "$ort_lib" "$b/lib/libonnxruntime.so"
  backend_args="--backend ort --ort-lib /opt/mae-edge/lib/libonnxruntime.so"
fi

cat > "$b/mae-run.env" <<EOF
# mae-run serve settings, read by mae-run.service (install as /etc/mae-edge/mae-run.env).
# The model and its SHA-256: the service refuses any other file.
MAE_MODEL=/opt/mae-edge/models/$model_name
MAE_MODEL_SHA256=$sha
# Address to serve. A non-loopback address needs the API keys file below.
MAE_LISTEN=0.0.0.0:8080
# Bearer tokens: one 'SHA256HEX NAME' line per client (see INSTALL.md).
MAE_API_KEYS=/etc/mae-edge/api-keys
# Backend and any other flags of 'mae-run serve' (e.g. --max-batch 8 --threads 4).
MAE_BACKEND_ARGS="$backend_args"
MAE_EXTRA_ARGS="--audit-log /var/lib/mae-edge/audit.jsonl"
EOF

cat > "$b/mae-run.service" <<'EOF'
[Unit]
Description=mae-run image classification service (Open Inference Protocol and /v1 API)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
EnvironmentFile=/etc/mae-edge/mae-run.env
ExecStart=/opt/mae-edge/bin/mae-run serve --model ${MAE_MODEL} --expect-sha256 ${MAE_MODEL_SHA256} --listen ${MAE_LISTEN} --api-keys ${MAE_API_KEYS} $MAE_BACKEND_ARGS $MAE_EXTRA_ARGS
Restart=on-failure
RestartSec=5
# An unprivileged user made for the service; state (the audit log) in /var/lib/mae-edge.
DynamicUser=yes
StateDirectory=mae-edge
StateDirectoryMode=0700
UMask=0077
# The file system is read-only to the service except its state folder; the program and the
# model are read-only even to the service's own user.
ProtectSystem=strict
ReadOnlyPaths=/opt/mae-edge
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources

[Install]
WantedBy=multi-user.target
EOF

cat > "$b/INSTALL.md" <<EOF
# mae-run edge service

This folder holds \`mae-run\` (a single static-ish Linux executable; no Python), the model
\`models/$model_name\` (SHA-256 \`$sha\`)$( [ -n "$ort_lib" ] && printf ', ONNX Runtime (`lib/libonnxruntime.so`)' ),
a systemd unit and its settings. \`MODEL_CARD.md\` describes the model: what it is for, the data
it was trained and validated on, its metrics, and its known limits. Read it before installing.

## Install (as root)

\`\`\`sh
cd mae-edge
sha256sum -c SHA256SUMS                       # every file as packed
mkdir -p /opt/mae-edge /etc/mae-edge
cp -r bin models $( [ -n "$ort_lib" ] && printf 'lib ' )/opt/mae-edge/
install -m 0644 mae-run.env /etc/mae-edge/mae-run.env
install -m 0644 mae-run.service /etc/systemd/system/mae-run.service
\`\`\`

## API keys

Clients send \`Authorization: Bearer TOKEN\`. The server keeps only the SHA-256 of each token,
one \`SHA256HEX NAME\` line per client; the name appears in the audit log.

\`\`\`sh
tok=\$(openssl rand -hex 32); echo "give this token to the client: \$tok"
printf '%s %s\n' "\$(printf %s "\$tok" | sha256sum | cut -d' ' -f1)" ward-7 >> /etc/mae-edge/api-keys
chmod 0644 /etc/mae-edge/api-keys
\`\`\`

## Start and check

\`\`\`sh
systemctl daemon-reload && systemctl enable --now mae-run
curl -s http://HOST:8080/v2/health/ready                    # no token needed
curl -s -H "Authorization: Bearer \$tok" http://HOST:8080/v2/models/${model_name%.onnx}
curl -s -H "Authorization: Bearer \$tok" --data-binary @scan.png http://HOST:8080/v1/predict
journalctl -u mae-run                                       # start-up messages
\`\`\`

Settings are in \`/etc/mae-edge/mae-run.env\` (address, keys file, flags). The service refuses a
model whose SHA-256 is not the one recorded there. Audit records (one JSON line per
prediction, with the key name and the caller's address) go to
\`/var/lib/mae-edge/audit.jsonl\`. The service runs as an unprivileged dynamic user, sees the
file system read-only except that folder, and cannot gain privileges.

## Triton / KServe clients

The service speaks the Open Inference Protocol (KServe v2) at \`/v2\`: Triton's
\`tritonclient.http\` works unchanged with \`headers={"Authorization": "Bearer TOKEN"}\`.
EOF

(cd "$b" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort \
  | xargs sha256sum > SHA256SUMS)

out_dir=$(dirname "$out")
mkdir -p "$out_dir"
tmp_out=$(mktemp "$out_dir/.mae-edge.XXXXXX")
tar -C "$work" --owner=0 --group=0 -czf "$tmp_out" mae-edge
mv -f "$tmp_out" "$out"
tmp_out=""
say "wrote $out ($(du -h "$out" | cut -f1)): model $model_name, sha256 ${sha:0:12}$( [ -n "$ort_lib" ] && echo ', with ONNX Runtime')"
