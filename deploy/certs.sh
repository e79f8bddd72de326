#!/usr/bin/env bash
# Certificates and keys for a privtune federation (run by the model owner, once).
#
#   deploy/certs.sh [--out DIR] [--nodes N] [--host NAME_OR_IP]... [--days D] [--force]
#
# Makes, under DIR (default deploy/certs):
#   ca.crt, ca.key          a private certificate authority. ca.crt goes to every data owner (their
#                           SuperNode checks the SuperLink against it); ca.key never leaves DIR.
#   server.pem, server.key  the SuperLink's TLS certificate, valid for localhost, 127.0.0.1 and
#                           every --host given (the name or IP data owners dial).
#   nodes/node-I, .pub      one SuperNode authentication key pair per data owner (I = 1..N).
#                           Flower 1.41 wants ECDSA keys in OpenSSH format on a NIST curve; P-384
#                           here. The private key goes to data owner I only; the model owner
#                           registers node-I.pub with the SuperLink (deploy/superlink.sh does).
#
# Safe to re-run: what exists is kept, missing node keys are added. A server certificate that
# lacks a requested --host is an error rather than a silent re-issue (data owners may already
# hold the old CA); --force deletes DIR's certificates and keys and starts over.
set -euo pipefail

out="$(dirname "$0")/certs"
nodes=3
days=825
force=0
hosts=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --host) hosts+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

[[ "$nodes" =~ ^[0-9]+$ ]] || { echo "certs.sh: --nodes expects a number, got '$nodes'" >&2; exit 2; }
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "certs.sh: '$tool' is required (install openssl / openssh-client)" >&2; exit 1; }
done

mkdir -p "$out/nodes"
chmod 700 "$out"

if [[ $force == 1 ]]; then
  rm -f "$out"/ca.crt "$out"/ca.key "$out"/ca.srl "$out"/server.pem "$out"/server.key "$out"/server.csr "$out"/nodes/node-*
fi

# Subject alternative names: the loopback names (one-machine runs) plus each --host.
san="DNS:localhost,IP:127.0.0.1"
for h in "${hosts[@]+"${hosts[@]}"}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
done

if [[ -f "$out/ca.crt" && -f "$out/ca.key" ]]; then
  echo "kept     $out/ca.crt"
elif [[ -e "$out/ca.crt" || -e "$out/ca.key" ]]; then
  echo "certs.sh: $out has only one of ca.crt/ca.key; pass --force to make a new CA" >&2; exit 1
else
  openssl ecparam -name secp384r1 -genkey -noout -out "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -sha384 -days "$days" -subj "/CN=privtune federation CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.crt" 2>/dev/null
  chmod 600 "$out/ca.key"
  rm -f "$out/server.pem" "$out/server.key"  # a new CA invalidates the old server certificate
  echo "created  $out/ca.crt"
fi

if [[ -f "$out/server.pem" && -f "$out/server.key" ]]; then
  have="$(openssl x509 -in "$out/server.pem" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')"
  have="${have//IPAddress:/IP:}"
  IFS=, read -r -a wanted <<< "$san"
  for name in "${wanted[@]}"; do
    if [[ ",$have," != *",$name,"* ]]; then
      echo "certs.sh: $out/server.pem does not cover $name (it has: $have); pass --force to re-issue everything" >&2
      exit 1
    fi
  done
  echo "kept     $out/server.pem ($have)"
else
  openssl ecparam -name secp384r1 -genkey -noout -out "$out/server.key"
  openssl req -new -key "$out/server.key" -subj "/CN=privtune-superlink" -out "$out/server.csr"
  extfile="$(mktemp)"
  trap 'rm -f "$extfile"' EXIT
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$extfile"
  openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -sha384 -days "$days" -extfile "$extfile" -out "$out/server.pem" 2>/dev/null
  rm -f "$out/server.csr"
  chmod 600 "$out/server.key"
  echo "created  $out/server.pem ($san)"
fi

for ((i = 1; i <= nodes; i++)); do
  key="$out/nodes/node-$i"
  if [[ -f "$key" && -f "$key.pub" ]]; then
    echo "kept     $key"
  elif [[ -e "$key" || -e "$key.pub" ]]; then
    echo "certs.sh: $key has only one half of its key pair; pass --force to regenerate" >&2; exit 1
  else
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "privtune-node-$i" -f "$key"
    echo "created  $key (+ .pub)"
  fi
done
