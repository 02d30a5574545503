#!/usr/bin/env bash
# Make sure the local Redis and/or RabbitMQ answer; start them (installing with apt-get if missing) when not.
# `compose`: make sure a Compose client is installed (tests/ops/test_compose.py validates docker-compose.yml with
# it, offline; no Docker engine needed): the `docker compose` plugin, else Debian's docker-compose package.
set -euo pipefail

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then echo "need root to apt-get install $*" >&2; return 1; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  redis_up && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 50); do redis_up && return 0; sleep 0.2; done
  echo "redis did not start" >&2; return 1
}

ensure_rabbitmq() {
  rabbit_up && return 0
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    if rabbit_up && rabbitmqctl -q status >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "rabbitmq did not start" >&2; return 1
}

ensure_compose() {
  docker compose version >/dev/null 2>&1 && return 0
  command -v docker-compose >/dev/null && return 0
  apt_install docker-compose
}

for service in "$@"; do
  case "$service" in
    redis) ensure_redis ;;
    rabbitmq) ensure_rabbitmq ;;
    compose) ensure_compose ;;
    *) echo "unknown service $service" >&2; exit 2 ;;
  esac
done
