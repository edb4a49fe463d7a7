#!/usr/bin/env bash
# Starts the local PostgreSQL and Redis the tests use, when they are down (the commands of this machine
# kind). Tests that need a service skip with a reason only if it still cannot be reached.
set -uo pipefail
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  fi
fi
# Headless Chromium for the /docs rendering test (Debian's package; best effort: that test says so if it is absent)
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (timeout 300 apt-get update -qq && timeout 600 apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the headless-browser test will skip" >&2
fi
# The Docker engine for tests/test_compose_stack.py, when it is installed but not running (best effort; that test
# says why it skips otherwise). Installing it is left to the operator: docs/docker.md.
if command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  mkdir -p /var/log/privface 2>/dev/null || true
  (nohup dockerd >/var/log/privface/dockerd.log 2>&1 &) || true
  for _ in $(seq 1 20); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "warning: PostgreSQL or Redis is still down; tests that need them will say so" >&2
