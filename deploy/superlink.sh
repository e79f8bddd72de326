#!/usr/bin/env bash
# Model owner: start the Flower SuperLink with TLS and SuperNode authentication, register the data
# owners' public keys, and write the `flwr` connection that `flwr run . NAME` uses.
#
#   deploy/superlink.sh [--certs DIR] [--host BIND] [--port PORT] [--address HOST:PORT]
#                       [--connection NAME] [--keys DIR | --register KEY.pub...] [--database FILE]
#                       [--background] [--state DIR]
#
#   --certs DIR        ca.crt, server.pem, server.key from deploy/certs.sh (default deploy/certs)
#   --host BIND        interface to listen on (default 127.0.0.1; 0.0.0.0 for other machines)
#   --port PORT        the one HTTPS port Flower 1.41 serves Fleet, Control and Runtime APIs on
#                      (default 9092)
#   --address H:P      where this machine's `flwr` CLI reaches the SuperLink (default 127.0.0.1:PORT)
#   --connection NAME  name of the connection written to $FLWR_HOME/config.toml (default privtune)
#   --keys DIR         register every DIR/*.pub: the data owners' public keys, OpenSSH ECDSA
#                      (default: the certificate folder's nodes/)
#   --register KEY     register just this public key instead; repeatable
#                      Keys already registered are left as they are.
#   --database FILE    keep SuperLink state (registered nodes, runs) in FILE across restarts
#                      (default: in memory; keys are registered again at every start)
#   --background       detach: log to STATE/superlink.log, pid in STATE/superlink.pid, return once
#                      the keys are registered. Stop with: kill "$(cat STATE/superlink.pid)"
#   --state DIR        where --background keeps its log and pid file (default runs/superlink)
#
# Without --background the SuperLink runs in the foreground until Ctrl-C.
# Flower's config folder is $FLWR_HOME (default ~/.flwr): the CLI connection is written there and
# the SuperLink installs the app bundle (FAB) there for each run.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
[[ -x "$repo/.venv/bin/flower-superlink" ]] && export PATH="$repo/.venv/bin:$PATH"

certs="$here/certs"
host=127.0.0.1
port=9092
address=""
connection=privtune
keys_dir=""
database=""
background=0
state="$repo/runs/superlink"
keys=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) certs="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --address) address="$2"; shift 2 ;;
    --connection) connection="$2"; shift 2 ;;
    --keys) keys_dir="$2"; shift 2 ;;
    --register) keys+=("$2"); shift 2 ;;
    --database) database="$2"; shift 2 ;;
    --background) background=1; shift ;;
    --state) state="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "superlink.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

address="${address:-127.0.0.1:$port}"
certs="$(cd "$certs" 2>/dev/null && pwd)" || { echo "superlink.sh: no certificate folder; run deploy/certs.sh first" >&2; exit 1; }
for f in ca.crt server.pem server.key; do
  [[ -f "$certs/$f" ]] || { echo "superlink.sh: $certs/$f is missing; run deploy/certs.sh" >&2; exit 1; }
done
if [[ ${#keys[@]} -eq 0 ]]; then
  shopt -s nullglob
  keys=("${keys_dir:-$certs/nodes}"/*.pub)
  shopt -u nullglob
fi
command -v flower-superlink >/dev/null || { echo "superlink.sh: flower-superlink not on PATH; activate the venv (make setup)" >&2; exit 1; }

# Runtime dependency installation (uv sync of the app's dependencies per run) is off: the SuperLink
# runs the ServerApp with the environment it was started in, which already has privtune's pinned stack.
cmd=(flower-superlink
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key"
  --enable-supernode-auth
  --host "$host" --port "$port"
  --disable-runtime-dependency-installation)
[[ -n "$database" ]] && cmd+=(--database "$database")

python "$here/flower_connection.py" --name "$connection" --address "$address" --root-certificates "$certs/ca.crt"

wait_ready() {  # poll the SuperLink's /health endpoint over TLS, checking its certificate
  python - "$address" "$certs/ca.crt" "$1" <<'EOF'
import ssl, sys, time, urllib.request, os
address, ca, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("superlink.sh: the SuperLink exited during startup (see its log)")
    try:
        with urllib.request.urlopen(f"https://{address}/health", context=context, timeout=2) as reply:
            if reply.status == 200:
                sys.exit(0)
    except OSError:
        time.sleep(0.3)
sys.exit(f"superlink.sh: no answer from https://{address}/health within 60 s")
EOF
}

register_keys() {
  for key in "${keys[@]+"${keys[@]}"}"; do
    name="$(basename "$key" .pub)"
    if out="$(flwr supernode register "$key" "$connection" --name "$name" 2>&1)"; then
      echo "registered $key"
    elif grep -qi "already in use" <<< "$out"; then
      echo "already registered $key"
    else
      echo "superlink.sh: could not register $key:" >&2; echo "$out" >&2; return 1
    fi
  done
}

if [[ $background == 1 ]]; then
  mkdir -p "$state"
  setsid "${cmd[@]}" > "$state/superlink.log" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$state/superlink.pid"
  wait_ready "$pid" || { kill "$pid" 2>/dev/null; exit 1; }
  register_keys || { kill "$pid"; exit 1; }
  echo "SuperLink running (pid $pid) on https://$host:$port; log: $state/superlink.log"
  echo "stop it with: kill $pid"
  exit 0
fi

"${cmd[@]}" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' INT TERM
if wait_ready "$pid" && register_keys; then
  echo "SuperLink ready on https://$host:$port; launch a run with: flwr run . $connection --stream"
else
  kill -TERM "$pid" 2>/dev/null
fi
status=0
wait "$pid" || status=$?  # returns early when Ctrl-C arrives; then wait for the shutdown
while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done
exit "$status"
