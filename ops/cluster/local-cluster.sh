#!/usr/bin/env bash
# A Natter cluster on this one machine, from Debian's packages, to try cluster mode:
# 2 PostgreSQL shards, 1 NATS, 3 Natter nodes and nginx in front of them.
#
#   apt-get install postgresql nats-server nginx curl    # Debian 12
#   cargo build --release
#   ops/cluster/local-cluster.sh up        # then use http://127.0.0.1:8100
#   ops/cluster/local-cluster.sh status
#   ops/cluster/local-cluster.sh restart 2 # a rolling restart of node 2
#   ops/cluster/local-cluster.sh down      # stops everything and deletes its data
#
# Settings (environment): NATTER_BIN (default target/release/natter), CLUSTER_DIR (default
# /tmp/natter-cluster), PORT_BASE (default 8100: nginx on it, node N on PORT_BASE+N, with
# its /metrics there too; nginx does not pass /metrics), PG_PORT (default 5501: shards on
# it and the next), NATS_PORT (default 4222). Other NATTER_* variables reach every node
# (e.g. NATTER_SEND_RATE for a benchmark). Nothing listens beyond 127.0.0.1. PostgreSQL
# runs as the `postgres` user when this runs as root (it refuses root).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${NATTER_BIN:-$root/target/release/natter}"
dir="${CLUSTER_DIR:-/tmp/natter-cluster}"
base="${PORT_BASE:-8100}"
pg_port="${PG_PORT:-5501}"
nats_port="${NATS_PORT:-4222}"
pg_bin=/usr/lib/postgresql/15/bin
nodes=(1 2 3)
shards=(0 1)

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

need() {
    command -v "$1" >/dev/null || [ -x "$1" ] || { echo "missing $1: $2" >&2; exit 1; }
}

store_urls() {
    local urls=()
    for s in "${shards[@]}"; do
        urls+=("postgres://postgres@127.0.0.1:$((pg_port + s))/natter")
    done
    (IFS=,; echo "${urls[*]}")
}

wait_http() {
    for _ in $(seq 1 150); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "$1 did not answer${2:+; the end of $2:}" >&2
    [ -z "${2:-}" ] || tail -n 20 "$2" >&2
    return 1
}

start_node() {
    local n=$1
    mkdir -p "$dir/node$n"
    NATTER_DRAIN_DELAY_SECS=1 NATTER_TRUSTED_PROXIES=127.0.0.1 \
        nohup "$bin" serve \
        --listen "127.0.0.1:$((base + n))" \
        --data-dir "$dir/node$n" \
        --store "$(store_urls)" \
        --bus "nats://127.0.0.1:$nats_port" \
        --node-id "$n" \
        >>"$dir/node$n.log" 2>&1 &
    echo $! >"$dir/node$n.pid"
    wait_http "http://127.0.0.1:$((base + n))/readyz" "$dir/node$n.log"
}

stop_node() {
    local n=$1 pid
    [ -f "$dir/node$n.pid" ] || return 0
    pid=$(cat "$dir/node$n.pid")
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$dir/node$n.pid"
}

up() {
    need "$pg_bin/postgres" "apt-get install postgresql"
    need nats-server "apt-get install nats-server"
    need /usr/sbin/nginx "apt-get install nginx"
    need curl "apt-get install curl"
    [ -x "$bin" ] || { echo "no $bin: run cargo build --release (or set NATTER_BIN)" >&2; exit 1; }
    [ ! -e "$dir" ] || { echo "$dir exists: run '$0 down' first" >&2; exit 1; }
    mkdir -p "$dir"
    chmod 755 "$dir"
    for s in "${shards[@]}"; do
        local data="$dir/pg$s"
        mkdir -p "$data"
        [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$data"
        as_postgres "$pg_bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
        as_postgres "$pg_bin/pg_ctl" -D "$data" -l "$data/server.log" -w -o \
            "-p $((pg_port + s)) -c listen_addresses=127.0.0.1 -k $data" start >/dev/null
        as_postgres "$pg_bin/createdb" -h 127.0.0.1 -p $((pg_port + s)) -U postgres natter
    done
    echo "PostgreSQL shards on ports $pg_port, $((pg_port + 1))"
    nohup nats-server -c "$here/nats.conf" -a 127.0.0.1 -p "$nats_port" \
        >"$dir/nats.log" 2>&1 &
    echo $! >"$dir/nats.pid"
    echo "NATS on port $nats_port"
    for n in "${nodes[@]}"; do
        start_node "$n"
        echo "node $n on port $((base + n))"
    done
    local site="$dir/site.conf"
    sed -e "s/127.0.0.1:8100/127.0.0.1:$base/" \
        -e "s/127.0.0.1:8101/127.0.0.1:$((base + 1))/" \
        -e "s/127.0.0.1:8102/127.0.0.1:$((base + 2))/" \
        -e "s/127.0.0.1:8103/127.0.0.1:$((base + 3))/" \
        "$here/nginx.conf" >"$site"
    mkdir -p "$dir/nginx"
    cat >"$dir/nginx.conf" <<CONF
pid $dir/nginx.pid;
error_log $dir/nginx/error.log;
events { worker_connections 4096; }
http {
    access_log $dir/nginx/access.log;
    client_body_temp_path $dir/nginx/body;
    proxy_temp_path $dir/nginx/proxy;
    fastcgi_temp_path $dir/nginx/fastcgi;
    uwsgi_temp_path $dir/nginx/uwsgi;
    scgi_temp_path $dir/nginx/scgi;
    include $site;
}
CONF
    /usr/sbin/nginx -c "$dir/nginx.conf"
    wait_http "http://127.0.0.1:$base/readyz"
    echo "nginx on http://127.0.0.1:$base: the cluster is up"
}

down() {
    [ -d "$dir" ] || { echo "nothing at $dir"; return 0; }
    if [ -f "$dir/nginx.pid" ]; then
        /usr/sbin/nginx -c "$dir/nginx.conf" -s quit 2>/dev/null || true
        for _ in $(seq 1 50); do [ -f "$dir/nginx.pid" ] || break; sleep 0.1; done
    fi
    for n in "${nodes[@]}"; do stop_node "$n"; done
    if [ -f "$dir/nats.pid" ]; then kill "$(cat "$dir/nats.pid")" 2>/dev/null || true; fi
    for s in "${shards[@]}"; do
        [ -d "$dir/pg$s" ] && as_postgres "$pg_bin/pg_ctl" -D "$dir/pg$s" -m fast -w stop \
            >/dev/null 2>&1 || true
    done
    rm -rf "$dir"
    echo "the cluster is down and its data deleted"
}

status() {
    for n in "${nodes[@]}"; do
        printf 'node %s: ' "$n"
        curl -fsS "http://127.0.0.1:$((base + n))/readyz" | tr '\n' ' ' || printf 'not answering'
        echo
    done
    printf 'nginx: '
    curl -fsS "http://127.0.0.1:$base/readyz" | head -1 || echo 'not answering'
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    restart)
        n="${2:?which node}"
        stop_node "$n"
        start_node "$n"
        echo "node $n restarted"
        ;;
    *) echo "usage: $0 up|down|status|restart N" >&2; exit 2 ;;
esac
