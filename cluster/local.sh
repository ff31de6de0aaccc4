#!/usr/bin/env bash
# A local Ray cluster on 127.0.0.1 with token auth; the dashboard (and the jobs API) listen
# on loopback only.
#
#   cluster/local.sh up [--cpus N]     start the head (idempotent: an existing one is kept)
#   cluster/local.sh status            nodes and resources (authenticated)
#   cluster/local.sh env               export lines for clients: eval "$(cluster/local.sh env)"
#   cluster/local.sh down              stop this cluster's processes (and only them)
#
# The token is generated once (random, 64 hex, file mode 600) in $CAI_RAY_CLUSTER_DIR/auth_token
# and handed to Ray as RAY_AUTH_TOKEN_PATH: it never appears on a command line or in a log.
# Clients (ray job submit, cai-ray --address) need RAY_AUTH_MODE=token and that path, which
# `env` prints. Without them the jobs API answers 401.
#
# Settings (environment): CAI_RAY_CLUSTER_DIR (default /tmp/cai-ray-cluster-$UID),
# CAI_RAY_GCS_PORT (6390), CAI_RAY_DASHBOARD_PORT (8265), CAI_RAY_AGENT_PORT and
# CAI_RAY_CLIENT_PORT (the node's job agent and the Ray client server; default free ports, so
# another Ray on this machine -- a test session's ray.init() holds 52365 and 10001 -- does not
# leave the head without a job agent), CAI_RAY_TEMP_DIR (Ray's session files; default
# /tmp/cai-ray-$UID-$GCS_PORT), RAY (the ray CLI; default the checkout's .venv/bin/ray, else
# ray on PATH).
#
# Ray binds its node services to the machine's address, not 127.0.0.1 (`ray start` replaces a
# loopback --node-ip-address); every one of them requires the token.
set -euo pipefail

DIR=${CAI_RAY_CLUSTER_DIR:-/tmp/cai-ray-cluster-$(id -u)}
GCS_PORT=${CAI_RAY_GCS_PORT:-6390}
DASH_PORT=${CAI_RAY_DASHBOARD_PORT:-8265}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/ray" ]]; then RAY="$ROOT/.venv/bin/ray"; else RAY=$(command -v ray || true); fi
fi
[[ -n "$RAY" ]] || { echo "local.sh: no ray CLI (run 'make setup' or set RAY=)" >&2; exit 2; }
TOKEN="$DIR/auth_token"
# Ray's own temp dir: short (its socket paths must stay under 107 bytes) and one per cluster.
TMP=${CAI_RAY_TEMP_DIR:-/tmp/cai-ray-$(id -u)-$GCS_PORT}

auth_env() {
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"
  unset RAY_AUTH_TOKEN  # it would take precedence over the file
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

running() { pgrep -u "$(id -u)" -f -- "gcs_server.*$TMP" >/dev/null 2>&1; }

dashboard_up() {
  local code
  # the header goes to curl on stdin (printf is a shell builtin): never on a command line,
  # where `ps` would show it to every user of the machine
  code=$(printf 'Authorization: Bearer %s\n' "$(<"$TOKEN")" |
    curl -s -o /dev/null -w '%{http_code}' -H @- "http://127.0.0.1:$DASH_PORT/api/version" || true)
  [[ "$code" == 200 ]]
}

cmd=${1:-}
shift || true
case "$cmd" in
  up)
    cpus=()
    if [[ "${1:-}" == "--cpus" ]]; then cpus=(--num-cpus "${2:?--cpus needs a number}"); fi
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    if [[ ! -s "$TOKEN" ]]; then
      (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN")
    fi
    auth_env
    if running; then
      echo "already up: jobs API on http://127.0.0.1:$DASH_PORT"
      exit 0
    fi
    # job entrypoints run `python ...` through a shell: the one beside this ray CLI (the venv)
    PATH="$(dirname "$RAY"):$PATH"
    agent_port=${CAI_RAY_AGENT_PORT:-$(free_port)}
    client_port=${CAI_RAY_CLIENT_PORT:-$(free_port)}
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
      --dashboard-agent-listen-port="$agent_port" --ray-client-server-port="$client_port" \
      --temp-dir="$TMP" --disable-usage-stats "${cpus[@]}" >"$DIR/start.log" 2>&1 \
      || { cat "$DIR/start.log" >&2; exit 1; }
    for _ in $(seq 60); do dashboard_up && break; sleep 1; done
    dashboard_up || { echo "local.sh: the dashboard did not come up on 127.0.0.1:$DASH_PORT" >&2; exit 1; }
    echo "Ray head on 127.0.0.1:$GCS_PORT; jobs API and dashboard on http://127.0.0.1:$DASH_PORT (token auth on)"
    echo "submit a job:"
    echo "  eval \"\$($0 env)\""
    echo "  ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/generate_tiny.yaml output=\$PWD/out/sl"
    ;;
  status)
    auth_env
    running || { echo "down"; exit 3; }
    # right after `up` the autoscaler has not published a status yet: wait for it
    for _ in $(seq 30); do
      out=$("$RAY" status --address "127.0.0.1:$GCS_PORT" 2>&1) || { echo "$out" >&2; exit 1; }
      [[ "$out" == *"No cluster status"* ]] || break
      sleep 1
    done
    echo "$out"
    ;;
  env)
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN"
    echo "unset RAY_AUTH_TOKEN"
    ;;
  down)
    # `ray stop` would stop every Ray on this machine; this cluster's processes all carry
    # its temp dir on their command line.
    pkill -TERM -u "$(id -u)" -f -- "$TMP" 2>/dev/null || true
    for _ in $(seq 30); do pgrep -u "$(id -u)" -f -- "$TMP" >/dev/null || break; sleep 1; done
    pkill -KILL -u "$(id -u)" -f -- "$TMP" 2>/dev/null || true
    echo "down"
    ;;
  *)
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
    [[ "$cmd" == "-h" || "$cmd" == "--help" ]] || exit 2
    ;;
esac
