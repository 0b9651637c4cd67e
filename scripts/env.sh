# shellcheck shell=bash
# The one place that defines where the local services live. Sourced by
# scripts/services, scripts/test and the Kafka tool wrappers; the Rust test
# helpers (tests/common/mod.rs) use the same defaults.
#
# Every value can be overridden from the environment, e.g.
#   DATABASE_URL=postgres://me:pw@db:5432/outbox scripts/test
# (scripts/services itself always provisions on loopback, see below.)

OUTBOX_REPO="${OUTBOX_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

# What the tests, examples and tutorials connect to.
DATABASE_URL="${DATABASE_URL:-postgres://outbox:outbox@127.0.0.1:5432/outbox}"
KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"

# What scripts/services provisions (PostgreSQL from Debian packages, Kafka in KRaft
# mode from Maven Central jars). The role, password and database match DATABASE_URL.
PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
PG_USER="${PG_USER:-outbox}"
PG_PASSWORD="${PG_PASSWORD:-outbox}"
PG_DATABASE="${PG_DATABASE:-outbox}"
PG_MAX_CONNECTIONS="${PG_MAX_CONNECTIONS:-300}"
# Replication slots and WAL senders (log capture; each test streams a database of its own).
PG_MAX_SLOTS="${PG_MAX_SLOTS:-64}"

KAFKA_HOST="${KAFKA_HOST:-127.0.0.1}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
# Jars, configuration, data (log.dirs), log file and pid file of the local broker.
# Git-ignored; delete it to start from nothing.
KAFKA_CACHE_DIR="${KAFKA_CACHE_DIR:-$OUTBOX_REPO/.cache/kafka}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
# Seconds `scripts/services up` waits for the broker to answer a metadata request.
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"

# PgBouncer in transaction mode in front of the same PostgreSQL (the tests in
# tests/pgbouncer.rs connect through it; they are skipped when PGBOUNCER_URL is
# empty). Any database of the server is reachable through it, with the same role.
PGBOUNCER_HOST="${PGBOUNCER_HOST:-127.0.0.1}"
PGBOUNCER_PORT="${PGBOUNCER_PORT:-6432}"
PGBOUNCER_URL="${PGBOUNCER_URL-postgres://$PG_USER:$PG_PASSWORD@$PGBOUNCER_HOST:$PGBOUNCER_PORT/$PG_DATABASE}"
# Configuration, user list, log file and pid file of the local PgBouncer (git-ignored).
PGBOUNCER_CACHE_DIR="${PGBOUNCER_CACHE_DIR:-$OUTBOX_REPO/.cache/pgbouncer}"
# Server connections per database and role (each test database is a pool of its own).
PGBOUNCER_POOL_SIZE="${PGBOUNCER_POOL_SIZE:-10}"

# NATS with JetStream (outbox-nats and its tests; the NATS tests are skipped when
# NATS_URL is empty). nats-server is built once from its Go module with the
# machine's Go (`go install`) into $NATS_CACHE_DIR/bin; its JetStream store, log
# and pid file live there too (git-ignored).
NATS_HOST="${NATS_HOST:-127.0.0.1}"
NATS_PORT="${NATS_PORT:-4222}"
NATS_URL="${NATS_URL-nats://$NATS_HOST:$NATS_PORT}"
NATS_CACHE_DIR="${NATS_CACHE_DIR:-$OUTBOX_REPO/.cache/nats}"
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-v2.15.3}"

export OUTBOX_REPO DATABASE_URL KAFKA_BROKERS PGBOUNCER_URL NATS_URL
export NATS_HOST NATS_PORT NATS_CACHE_DIR NATS_SERVER_VERSION
export PG_HOST PG_PORT PG_USER PG_PASSWORD PG_DATABASE PG_MAX_CONNECTIONS PG_MAX_SLOTS
export PGBOUNCER_HOST PGBOUNCER_PORT PGBOUNCER_CACHE_DIR PGBOUNCER_POOL_SIZE
export KAFKA_HOST KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_CACHE_DIR KAFKA_HEAP_OPTS KAFKA_START_TIMEOUT
