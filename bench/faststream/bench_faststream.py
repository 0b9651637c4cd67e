"""Benchmark of faststream-outbox (Python) relaying a PostgreSQL outbox to Kafka.

Counterpart of ``examples/bench.rs``: same PostgreSQL server, same Kafka broker, same
workloads, same JSON-lines result format (``"system": "faststream-outbox"``,
``"mode": "handler"``).

What runs (three processes, so that the relay's CPU and memory are its own):

* the **relay** (``relay`` sub-command, the process that is measured): the pattern of
  faststream-outbox's README, an ``OutboxBroker`` subscriber on the outbox queue with a
  stacked ``KafkaBroker`` publisher (aiokafka, ``acks="all"``). The handler returns a
  ``KafkaResponse`` carrying the body and the row's partition key. Its CPU seconds
  (``getrusage``, from just before ``broker.start()`` until it is told to stop) and peak
  RSS (``VmHWM``) are reported.
* the **consumer** (``consume`` sub-command): an aiokafka consumer on the topic that counts
  distinct ``order_id`` values and, for steady loads, computes the latency from the
  ``ts`` field of each message (wall clock written by the producer right before the
  INSERT ... COMMIT of its transaction) to the moment the consumer receives it.
* the **orchestrator** (default ``run`` sub-command, this process): creates the scratch
  database (``outbox_bench_fs`` next to ``DATABASE_URL``'s) and the outbox table with
  ``make_outbox_table`` + ``metadata.create_all``, a fresh topic per run, loads rows with
  ``OutboxBroker.publish_batch`` and writes one JSON line per run.

Workloads:

* ``drain``: ``--rows`` rows (~200 bytes of JSON, 100 partition keys) are committed first,
  then the relay starts; the time is from ``broker.start()`` to the consumer receiving the
  last distinct row. p50/p99/max are null. As in examples/bench.rs, batch size 1 drains
  10,000 rows and sizes 2..99 drain 50,000 (``--no-cap``: ``--rows`` at every size). A drain that is not done after ``--timeout``
  seconds is cut short and reports the rows delivered so far (marked TIME-CAPPED).
* ``steady-R``: at ``--steady-batch`` (100), the orchestrator commits R rows/s (a
  transaction every 10 ms) for ``--steady-seconds``; the result counts the rows delivered, ``seconds`` runs from the
  first commit to the last delivery, and the latencies are commit-to-Kafka-consumer.

The batch size maps to the subscriber's ``fetch_batch_size`` (rows claimed per fetch, the
size of its in-memory queue) and ``terminal_flush_batch_size`` (rows deleted per DELETE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit, urlunsplit

QUEUE = "bench_outbox"
TABLE = "fs_outbox"
KEYS = 100
NOTE = "x" * 80


# --------------------------------------------------------------------------- helpers


def sqlalchemy_url(url: str, database: str | None = None) -> str:
    """``postgres://...`` as a SQLAlchemy asyncpg URL, optionally with another database."""
    parts = urlsplit(url)
    path = f"/{database}" if database else parts.path
    return urlunsplit(("postgresql+asyncpg", parts.netloc, path, parts.query, parts.fragment))


def asyncpg_url(url: str, database: str) -> str:
    """Plain ``postgresql://`` URL (asyncpg) pointing at *database*."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, f"/{database}", parts.query, parts.fragment))


def body(order_id: int, ts: float) -> dict[str, Any]:
    """One outbox payload: ~200 bytes of JSON, partition key ``customer`` (100 distinct)."""
    return {
        "order_id": order_id,
        "customer": f"key-{order_id % KEYS}",
        "items": [{"sku": f"sku-{order_id % 100000:05d}", "qty": 1, "price_cents": 1999}],
        "note": NOTE,
        "ts": ts,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def stdin_lines() -> "asyncio.Queue[str]":
    """Lines of stdin delivered to the running event loop (read by a daemon thread)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        loop.call_soon_threadsafe(lines.put_nowait, "eof")

    threading.Thread(target=reader, daemon=True).start()
    return lines


def emit(message: dict[str, Any]) -> None:
    """One JSON object on stdout, for the orchestrator."""
    print(json.dumps(message), flush=True)


# --------------------------------------------------------------------------- relay process


@dataclass(frozen=True)
class RelaySettings:
    """Knobs of the faststream-outbox subscriber and the Kafka producer."""

    max_workers: int
    fetch_batch_size: int
    terminal_flush_batch_size: int
    min_fetch_interval: float
    max_fetch_interval: float
    linger_ms: int

    def describe(self) -> str:
        return (
            f"faststream-outbox {version('faststream-outbox')} (faststream {version('faststream')}, "
            f"aiokafka {version('aiokafka')}, SQLAlchemy {version('sqlalchemy')}, asyncpg {version('asyncpg')}, "
            f"Python {sys.version.split()[0]}); README relay pattern: @kafka_publisher stacked on "
            f"@outbox.subscriber, handler returns KafkaResponse(body, key); max_workers={self.max_workers} "
            f"fetch_batch_size={self.fetch_batch_size} terminal_flush_batch_size={self.terminal_flush_batch_size} "
            f"min_fetch_interval={self.min_fetch_interval} max_fetch_interval={self.max_fetch_interval} "
            f"lease_ttl_seconds=60 LISTEN/NOTIFY on; KafkaBroker acks=all linger_ms={self.linger_ms}"
        )


async def relay_main(args: argparse.Namespace) -> None:
    """Run the README relay until stdin says ``stop``; report CPU and peak RSS."""
    from faststream.kafka import KafkaBroker
    from faststream.kafka.response import KafkaResponse
    from faststream_outbox import OutboxBroker, make_outbox_table
    from sqlalchemy import MetaData
    from sqlalchemy.ext.asyncio import create_async_engine

    metadata = MetaData()
    outbox_table = make_outbox_table(metadata, table_name=TABLE)
    engine = create_async_engine(
        sqlalchemy_url(args.database_url, args.database), pool_size=args.max_workers + 4, max_overflow=4
    )
    broker_outbox = OutboxBroker(engine, outbox_table=outbox_table, logger=None)
    broker_kafka = KafkaBroker(args.brokers, acks="all", linger_ms=args.linger_ms, logger=None)
    publisher_kafka = broker_kafka.publisher(args.topic)

    @publisher_kafka
    @broker_outbox.subscriber(
        QUEUE,
        max_workers=args.max_workers,
        fetch_batch_size=args.fetch_batch_size,
        terminal_flush_batch_size=args.terminal_flush_batch_size,
        min_fetch_interval=args.min_fetch_interval,
        max_fetch_interval=args.max_fetch_interval,
    )
    async def relay(body: dict[str, Any]) -> KafkaResponse:
        return KafkaResponse(body, key=body["customer"].encode())

    commands = stdin_lines()
    await broker_kafka.connect()
    cpu0 = cpu_seconds()
    emit({"event": "ready", "t0": time.time()})
    await broker_outbox.start()
    while (await commands.get()) not in ("stop", "eof"):
        pass
    await broker_outbox.stop()
    await broker_kafka.stop()
    await engine.dispose()
    emit({"event": "stats", "cpu_s": cpu_seconds() - cpu0, "peak_rss_mb": peak_rss_mb()})


# --------------------------------------------------------------------------- consumer process


async def consume_main(args: argparse.Namespace) -> None:
    """Count distinct rows on the topic and collect commit-to-consume latencies.

    Protocol on stdin: ``expect N`` (finish once N distinct rows arrived) or ``stop``.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=args.brokers,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    partitions = [TopicPartition(args.topic, p) for p in range(args.partitions)]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    commands = stdin_lines()
    emit({"event": "ready"})

    seen: set[int] = set()
    latencies_ms: list[float] = []
    total = 0
    first_recv: float | None = None
    last_recv: float | None = None
    expect: int | None = None
    deadline: float | None = None
    while True:
        while not commands.empty():
            command = commands.get_nowait()
            if command.startswith("expect "):
                expect = int(command.split()[1])
                deadline = time.monotonic() + args.timeout
            elif command in ("stop", "eof"):
                expect, deadline = len(seen), time.monotonic()
        if expect is not None and (len(seen) >= expect or time.monotonic() >= (deadline or 0.0)):
            break
        batches = await consumer.getmany(timeout_ms=50, max_records=10_000)
        now = time.time()
        for records in batches.values():
            for record in records:
                total += 1
                message = json.loads(record.value)
                order_id = message["order_id"]
                if order_id in seen:
                    continue
                seen.add(order_id)
                if first_recv is None:
                    first_recv = now
                last_recv = now
                if args.latency:
                    latencies_ms.append((now - message["ts"]) * 1000.0)
    await consumer.stop()
    latencies_ms.sort()
    emit(
        {
            "event": "result",
            "distinct": len(seen),
            "total": total,
            "first_recv": first_recv,
            "last_recv": last_recv,
            "p50_ms": percentile(latencies_ms, 0.50) if latencies_ms else None,
            "p99_ms": percentile(latencies_ms, 0.99) if latencies_ms else None,
            "max_ms": latencies_ms[-1] if latencies_ms else None,
            "mean_ms": statistics.fmean(latencies_ms) if latencies_ms else None,
        }
    )


# --------------------------------------------------------------------------- orchestrator


class Child:
    """A sub-command of this script in its own process, talking JSON lines."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def read(self, event: str, timeout: float) -> dict[str, Any]:
        """Next JSON message with this ``event`` (blocking; this process has nothing else to do)."""
        assert self.proc.stdout is not None
        result: dict[str, Any] = {}

        def wait() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    print(line, end="", file=sys.stderr)
                    continue
                if message.get("event") == event:
                    result.update(message)
                    return

        reader = threading.Thread(target=wait, daemon=True)
        reader.start()
        reader.join(timeout)
        if not result:
            self.kill()
            raise RuntimeError(f"{self.proc.args[2]}: no {event!r} within {timeout}s (exit {self.proc.poll()})")
        return result

    async def aread(self, event: str, timeout: float) -> dict[str, Any]:
        return await asyncio.to_thread(self.read, event, timeout)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Bench:
    """Database, topics and the runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        from faststream_outbox import OutboxBroker, make_outbox_table
        from sqlalchemy import MetaData
        from sqlalchemy.ext.asyncio import create_async_engine

        self.args = args
        self.metadata = MetaData()
        self.table = make_outbox_table(self.metadata, table_name=TABLE)
        self.engine = create_async_engine(sqlalchemy_url(args.database_url, args.database), pool_size=4)
        # Publisher side only (never started): broker.publish_batch inside our transactions.
        self.outbox = OutboxBroker(self.engine, outbox_table=self.table, logger=None)
        self.next_id = 0

    async def prepare_database(self) -> None:
        """Create the scratch database (once) and the outbox table as the docs say."""
        import asyncpg

        admin = await asyncpg.connect(asyncpg_url(self.args.database_url, urlsplit(self.args.database_url).path[1:]))
        try:
            exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.args.database)
            if not exists:
                await admin.execute(f'CREATE DATABASE "{self.args.database}"')
        finally:
            await admin.close()
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    async def reset_table(self) -> None:
        from sqlalchemy import text

        async with self.engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {TABLE}"))

    async def vacuum(self) -> None:
        from sqlalchemy import text

        async with self.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f"VACUUM ANALYZE {TABLE}"))

    async def publish(self, count: int) -> None:
        """Commit *count* rows in one transaction with the library's publish_batch."""
        ts = time.time()
        bodies = [body(self.next_id + i, ts) for i in range(count)]
        self.next_id += count
        async with self.engine.begin() as conn:
            await self.outbox.publish_batch(*bodies, queue=QUEUE, session=conn)

    async def create_topic(self, name: str) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.args.brokers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=self.args.partitions, replication_factor=1)])
        finally:
            await admin.close()
        await asyncio.sleep(0.5)

    async def delete_topic(self, name: str) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.args.brokers)
        await admin.start()
        try:
            await admin.delete_topics([name])
        except Exception as error:  # noqa: BLE001 - cleanup is best effort
            print(f"bench_faststream: could not delete topic {name}: {error!r}", file=sys.stderr)
        finally:
            await admin.close()

    def settings(self, batch: int) -> RelaySettings:
        return RelaySettings(
            max_workers=self.args.max_workers,
            fetch_batch_size=batch,
            terminal_flush_batch_size=batch,
            min_fetch_interval=self.args.min_fetch_interval,
            max_fetch_interval=self.args.max_fetch_interval,
            linger_ms=self.args.linger_ms,
        )

    def start_relay(self, topic: str, s: RelaySettings) -> Child:
        a = self.args
        return Child(
            "relay", "--database-url", a.database_url, "--database", a.database, "--brokers", a.brokers,
            "--topic", topic, "--max-workers", str(s.max_workers), "--fetch-batch-size", str(s.fetch_batch_size),
            "--terminal-flush-batch-size", str(s.terminal_flush_batch_size),
            "--min-fetch-interval", str(s.min_fetch_interval), "--max-fetch-interval", str(s.max_fetch_interval),
            "--linger-ms", str(s.linger_ms),
        )  # fmt: skip

    def start_consumer(self, topic: str, latency: bool, timeout: float) -> Child:
        """The consumer; after ``expect N`` it waits at most *timeout* seconds for the rows."""
        argv = ["consume", "--brokers", self.args.brokers, "--topic", topic]
        argv += ["--partitions", str(self.args.partitions), "--timeout", str(timeout)]
        return Child(*argv, *(["--latency"] if latency else []))

    async def run(self, workload: str, batch: int) -> dict[str, Any]:
        """One measured run; returns the JSON-lines record."""
        s = self.settings(batch)
        topic = f"fs-bench-{workload}-{batch}-{uuid.uuid4().hex[:8]}"
        await self.reset_table()
        await self.create_topic(topic)
        steady_rate = int(workload.split("-")[1]) if workload.startswith("steady-") else 0
        extra = ""
        relay = consumer = None
        try:
            rows = self.drain_rows(batch)
            if workload == "drain":
                for start in range(0, rows, 5000):
                    await self.publish(min(5000, rows - start))
                await self.vacuum()
            wait = self.args.steady_grace if steady_rate else self.args.timeout
            consumer = self.start_consumer(topic, latency=bool(steady_rate), timeout=wait)
            await consumer.aread("ready", 60)
            relay = self.start_relay(topic, s)
            ready = await relay.aread("ready", 60)
            if workload == "drain":
                expected = rows
                started = ready["t0"]
            else:
                await asyncio.sleep(1.0)  # subscriber loops up and LISTENing
                started = time.time()
                expected, offered = await self.steady_load(steady_rate)
                extra = f"; offered {offered:.0f} msgs/s for {self.args.steady_seconds}s (commit every 10 ms)"
            consumer.send(f"expect {expected}")
            result = await consumer.aread("result", wait + 60)
            relay.send("stop")
            stats = await relay.aread("stats", 60)
        finally:
            for child in (relay, consumer):
                if child is not None:
                    child.kill()
            await self.delete_topic(topic)
        delivered = result["distinct"]
        if delivered < expected:
            if steady_rate:
                extra += f"; INCOMPLETE: {delivered} of {expected} rows delivered ({wait:.0f}s after the last commit)"
            else:
                extra += f"; TIME-CAPPED: {delivered} of {expected} rows delivered in {wait:.0f}s (rate of a partial drain)"
        if result["total"] > delivered:
            extra += f"; {result['total'] - delivered} duplicates"
        seconds = (result["last_recv"] or time.time()) - started
        return {
            "system": "faststream-outbox",
            "mode": "handler",
            "workload": workload,
            "batch_size": batch,
            "messages": delivered,
            "seconds": round(seconds, 4),
            "msgs_per_s": round(delivered / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
            "max_ms": result["max_ms"],
            "cpu_s": round(stats["cpu_s"], 3),
            "peak_rss_mb": round(stats["peak_rss_mb"], 1),
            "settings": s.describe() + f"; topic partitions={self.args.partitions}" + extra,
        }

    def drain_rows(self, batch: int) -> int:
        """Rows of a drain: like examples/bench.rs, batch 1 drains 10,000 and 2..99 drain 50,000 unless --no-cap."""
        if self.args.no_cap:
            return self.args.rows
        if batch == 1:
            return min(self.args.rows, 10_000)
        if batch < 100:
            return min(self.args.rows, 50_000)
        return self.args.rows

    async def steady_load(self, rate: int) -> tuple[int, float]:
        """Commit *rate* rows/s for ``--steady-seconds``; returns (rows, achieved offered rate)."""
        tick = 0.01
        target = int(rate * self.args.steady_seconds)
        begin = next_tick = time.monotonic()
        sent = 0
        while sent < target:
            due = min(target, int(rate * (time.monotonic() - begin)) + 1) - sent
            if due > 0:
                await self.publish(due)
                sent += due
            next_tick += tick
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        return sent, sent / (time.monotonic() - begin)

    async def run_with_retries(self, workload: str, batch: int, attempts: int = 3) -> dict[str, Any]:
        """:meth:`run`, rerun after the services come back when a run fails (e.g. a Kafka restart)."""
        for attempt in range(1, attempts + 1):
            try:
                return await self.run(workload, batch)
            except Exception as error:  # noqa: BLE001 - any failure: wait for the services, rerun
                if attempt == attempts:
                    raise
                print(f"bench_faststream: {workload} batch={batch} failed ({error!r}); rerunning", file=sys.stderr)
                await self.wait_for_services()
        raise AssertionError("unreachable")

    async def wait_for_services(self, timeout: float = 300.0) -> None:
        """Wait until PostgreSQL and Kafka accept TCP connections again (another engineer may restart them)."""
        pg = urlsplit(self.args.database_url)
        endpoints = [(pg.hostname or "127.0.0.1", pg.port or 5432)]
        endpoints += [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in self.args.brokers.split(",")]
        deadline = time.monotonic() + timeout
        for host, port in endpoints:
            while True:
                try:
                    _, writer = await asyncio.open_connection(host, port)
                    writer.close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(2.0)
        await asyncio.sleep(5.0)

    async def main(self) -> None:
        await self.prepare_database()
        out = open(self.args.json, "a", encoding="utf-8") if self.args.json else None
        try:
            for workload in self.args.workloads.split(","):
                batches = self.args.batches.split(",") if workload == "drain" else [str(self.args.steady_batch)]
                for batch in (int(b) for b in batches):
                    print(f"bench_faststream: {workload} batch={batch} ...", file=sys.stderr, flush=True)
                    record = await self.run_with_retries(workload, batch)
                    line = json.dumps(record)
                    print(line, flush=True)
                    if out is not None:
                        out.write(line + "\n")
                        out.flush()
        finally:
            if out is not None:
                out.close()
            await self.engine.dispose()


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the benchmark (default)")
    run.add_argument("--json", help="append JSON lines to this file")
    run.add_argument("--smoke", action="store_true", help="tiny sizes: proves the harness works")
    run.add_argument("--rows", type=int, default=200_000, help="drain backlog size")
    run.add_argument("--batches", default="1,10,100,1000")
    run.add_argument("--workloads", default="drain,steady-1000,steady-10000")
    run.add_argument("--steady-seconds", type=float, default=20.0)
    run.add_argument("--steady-batch", type=int, default=100, help="batch size of the steady runs")
    run.add_argument("--no-cap", action="store_true", help="drain --rows at every batch size")
    run.add_argument("--timeout", type=float, default=900.0, help="drain: seconds to wait for delivery")
    run.add_argument(
        "--steady-grace", type=float, default=60.0, help="steady: seconds to wait for delivery after the last commit"
    )
    run.add_argument("--database", default="outbox_bench_fs")
    run.add_argument("--partitions", type=int, default=6)
    run.add_argument("--max-workers", type=int, default=16)
    run.add_argument("--min-fetch-interval", type=float, default=1.0)
    run.add_argument("--max-fetch-interval", type=float, default=10.0)
    run.add_argument("--linger-ms", type=int, default=0)

    relay = sub.add_parser("relay", help="(internal) the measured relay process")
    relay.add_argument("--database", required=True)
    relay.add_argument("--topic", required=True)
    relay.add_argument("--max-workers", type=int, required=True)
    relay.add_argument("--fetch-batch-size", type=int, required=True)
    relay.add_argument("--terminal-flush-batch-size", type=int, required=True)
    relay.add_argument("--min-fetch-interval", type=float, required=True)
    relay.add_argument("--max-fetch-interval", type=float, required=True)
    relay.add_argument("--linger-ms", type=int, required=True)

    consume = sub.add_parser("consume", help="(internal) the Kafka consumer")
    consume.add_argument("--topic", required=True)
    consume.add_argument("--partitions", type=int, required=True)
    consume.add_argument("--timeout", type=float, required=True)
    consume.add_argument("--latency", action="store_true")

    for p in (run, relay, consume):
        p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "postgres://outbox:outbox@127.0.0.1:5432/outbox"))
        p.add_argument("--brokers", default=os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092"))

    if not argv or argv[0] not in ("run", "relay", "consume", "-h", "--help"):
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    if args.command == "run" and args.smoke:
        args.rows = min(args.rows, 2000)
        args.steady_seconds = 3.0
        args.timeout = min(args.timeout, 60.0)
        args.steady_grace = min(args.steady_grace, 10.0)
        if args.batches == "1,10,100,1000":
            args.batches = "100"
        if args.workloads == "drain,steady-1000,steady-10000":
            args.workloads = "drain,steady-1000"
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    if args.command == "relay":
        asyncio.run(relay_main(args))
    elif args.command == "consume":
        asyncio.run(consume_main(args))
    else:
        asyncio.run(Bench(args).main())


if __name__ == "__main__":
    main()
