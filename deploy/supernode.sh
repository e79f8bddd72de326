#!/usr/bin/env bash
# Data owner: start this site's Flower SuperNode (TLS + SuperNode authentication) with its node config.
#
#   deploy/supernode.sh --key FILE --data DIR [--superlink HOST:PORT] [--ca FILE] [--owner NAME]
#                       [--workspace DIR] [--port PORT] [--ult-table FILE --ult-key FILE]
#                       [--ldp-budget EPS] [--dp-budget EPS] [--max-retries N]
#
#   --key FILE         this site's private key (OpenSSH ECDSA; its .pub is registered by the model owner)
#   --data DIR         folder of .txt / .jsonl files: the private text, read only on this machine
#   --superlink H:P    the model owner's SuperLink (default 127.0.0.1:9092)
#   --ca FILE          CA certificate the model owner sent you (default deploy/certs/ca.crt)
#   --owner NAME       name in logs and the privacy ledger (default: the key file's name)
#   --workspace DIR    ledger, caches and Flower's app folder for this site (default runs/sites/NAME)
#   --port PORT        local port for the SuperNode's ClientApp API (default 9094; give each
#                      SuperNode on one machine its own)
#   --ult-table FILE, --ult-key FILE   federation ULT table and shared key (runs with encoding=ult)
#   --ldp-budget EPS   cap on this site's LDP epsilon; --dp-budget EPS: cap on its DP-SGD epsilon
#   --max-retries N    give up after N failed connection attempts (default: keep trying)
#
# Runs in the foreground until Ctrl-C. A key the SuperLink does not know, or a SuperLink whose
# certificate the CA does not vouch for, makes it exit at once with Flower's exit code 305.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
[[ -x "$repo/.venv/bin/flower-supernode" ]] && export PATH="$repo/.venv/bin:$PATH"

superlink=127.0.0.1:9092
ca="$here/certs/ca.crt"
key="" data="" owner="" workspace="" port=9094 ult_table="" ult_key="" ldp_budget="" dp_budget="" retries=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "supernode.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --key) key="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --owner) owner="$2"; shift 2 ;;
    --workspace) workspace="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --ult-table) ult_table="$2"; shift 2 ;;
    --ult-key) ult_key="$2"; shift 2 ;;
    --ldp-budget) ldp_budget="$2"; shift 2 ;;
    --dp-budget) dp_budget="$2"; shift 2 ;;
    --max-retries) retries="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "supernode.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

[[ -n "$key" ]] || fail "--key is required (this site's private key, e.g. deploy/certs/nodes/node-1)"
[[ -f "$key" ]] || fail "key file $key does not exist"
[[ -n "$data" ]] || fail "--data is required (a folder of .txt/.jsonl files)"
[[ -d "$data" ]] || fail "data folder $data does not exist"
[[ -f "$ca" ]] || fail "CA certificate $ca does not exist; ask the model owner for ca.crt and pass --ca"
[[ -n "$ult_table" && -z "$ult_key" || -z "$ult_table" && -n "$ult_key" ]] && fail "--ult-table and --ult-key go together"
command -v flower-supernode >/dev/null || fail "flower-supernode not on PATH; activate the venv (make setup)"

abspath() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }
owner="${owner:-$(basename "$key")}"
workspace="${workspace:-$repo/runs/sites/$owner}"
mkdir -p "$workspace"
workspace="$(cd "$workspace" && pwd)"

# Node config values are TOML strings/floats; single quotes delimit the strings.
quote() { [[ "$2" != *"'"* ]] || fail "$1 must not contain a single quote: $2"; printf "%s='%s'" "$1" "$2"; }
node_config="$(quote data-path "$(cd "$data" && pwd)") $(quote workspace "$workspace") $(quote owner "$owner")"
if [[ -n "$ult_table" ]]; then
  node_config+=" $(quote ult-table "$(abspath "$ult_table")") $(quote ult-key "$(abspath "$ult_key")")"
fi
[[ -n "$ldp_budget" ]] && node_config+=" ldp-budget=$ldp_budget"
[[ -n "$dp_budget" ]] && node_config+=" dp-budget=$dp_budget"

# Each site keeps its own Flower folder: the SuperNode unpacks every run's app bundle there, and
# SuperNodes sharing one folder on a machine would race on the same unpacked copy.
export FLWR_HOME="$workspace/flwr"

cmd=(flower-supernode
  --superlink "$superlink"
  --root-certificates "$ca"
  --auth-supernode-private-key "$key"
  --port "$port"
  --node-config "$node_config")
[[ -n "$retries" ]] && cmd+=(--max-retries "$retries")

echo "SuperNode '$owner' -> $superlink  (node config: $node_config)"
exec "${cmd[@]}"
