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

export OUTBOX_REPO DATABASE_URL KAFKA_BROKERS
export PG_HOST PG_PORT PG_USER PG_PASSWORD PG_DATABASE PG_MAX_CONNECTIONS PG_MAX_SLOTS
export KAFKA_HOST KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_CACHE_DIR KAFKA_HEAP_OPTS KAFKA_START_TIMEOUT
