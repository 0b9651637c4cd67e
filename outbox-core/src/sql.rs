//! Every SQL statement of the runtime, in one place so it can be reviewed as one.
//!
//! Table names come from validated [`crate::TableName`]s and are always quoted;
//! every value is a bind parameter.

use crate::Tables;

/// The columns a claim returns, in the order [`crate::claim`] reads them.
/// Times go out as integers computed in `float8` (`date_part`): `extract`
/// computes in `numeric`, several times slower per row, for a precision
/// (below the microsecond) nothing here uses.
///
/// Every expression holds for any storable value, so that one row written by
/// another producer cannot make the whole claim fail: times are clamped into
/// `int8` (`created_at = 'infinity'` would overflow the cast), and the
/// elapsed time is a difference of `float8` epochs (subtracting an infinite
/// `timestamptz` is an error).
const RETURNING: &str = "o.id, o.queue, o.payload, o.headers, o.partition_key, o.correlation_id, \
     o.attempts, o.deliveries, \
     greatest(least(date_part('epoch', o.created_at) * 1000, 9.2e18), -9.2e18)::int8 AS created_at_ms, \
     greatest(least((date_part('epoch', now()) - date_part('epoch', o.first_attempt_at)) * 1000000, 9.2e18), 0)::int8 AS elapsed_us, \
     o.ctid AS position, o.next_attempt_at AS due";

/// The position column of [`RETURNING`].
const POSITION_AS_TID: &str = "o.ctid AS position,";

/// The same position as the 6 bytes of the binary `tid` (block number, line
/// number, big-endian) in a `bytea`: sqlx looks the `tid` type up with
/// prepared statements of its own, which a pooler in transaction mode cannot
/// keep, and knows `bytea`.
const POSITION_AS_BYTES: &str = "substring(int8send((o.ctid::text::point)[0]::int8) FROM 5 FOR 4) \
     || substring(int4send((o.ctid::text::point)[1]::int4) FROM 3 FOR 2) AS position,";

/// `col` in ms since the Unix epoch, clamped into `int8` (see [`RETURNING`]).
macro_rules! epoch_ms {
    ($col:literal) => {
        concat!(
            "greatest(least(date_part('epoch', ",
            $col,
            ") * 1000, 9.2e18), -9.2e18)::int8"
        )
    };
}

/// `next_attempt_at` of a new row from `$delay_us` / `$at_epoch_us` parameters.
/// A delay counts from the statement (`clock_timestamp()`), not from the start
/// of the caller's transaction (`now()`), which may be long before.
fn due(delay: &str, at: &str) -> String {
    format!(
        "CASE WHEN {at} IS NOT NULL THEN to_timestamp({at} / 1000000.0) \
              WHEN {delay} IS NOT NULL THEN clock_timestamp() + {delay} * interval '1 microsecond' \
              ELSE now() END"
    )
}

/// Notifies the wake-up channel only while some subscriber sleeps, so that a
/// busy system does not pay for `pg_notify`'s commit-time lock on every publish.
fn notify_cte(t: &Tables, channel_param: &str, payload: &str) -> String {
    format!(
        "n AS (SELECT pg_notify({channel_param}, {payload}) FROM {listeners} \
               WHERE idle_until > now() AND EXISTS (SELECT 1 FROM ins) LIMIT 1)",
        listeners = t.outbox.derived("_listeners"),
    )
}

pub(crate) fn publish_one(t: &Tables, replace: bool) -> String {
    let conflict = if replace {
        format!(
            "DO UPDATE SET payload = excluded.payload, headers = excluded.headers, \
             partition_key = excluded.partition_key, correlation_id = excluded.correlation_id, \
             next_attempt_at = excluded.next_attempt_at, created_at = excluded.created_at \
             WHERE {o}.lease_token IS NULL",
            o = t.outbox.quoted()
        )
    } else {
        "DO NOTHING".to_owned()
    };
    format!(
        "WITH ins AS (\
            INSERT INTO {o} (queue, payload, headers, partition_key, correlation_id, next_attempt_at, timer_id) \
            VALUES ($1, $2, $3, $4, $5, {due}, $8::text) \
            ON CONFLICT (queue, timer_id) WHERE timer_id IS NOT NULL {conflict} \
            RETURNING id), \
         {notify} \
         SELECT ins.id FROM ins CROSS JOIN (SELECT count(*) FROM n) AS woke",
        o = t.outbox.quoted(),
        due = due("$6::int8", "$7::int8"),
        notify = notify_cte(t, "$9::text", "$1::text"),
    )
}

pub(crate) fn publish_batch(t: &Tables) -> String {
    format!(
        "WITH ins AS (\
            INSERT INTO {o} (queue, payload, headers, partition_key, correlation_id, next_attempt_at, timer_id) \
            SELECT u.q, u.p, u.h, u.k, u.c, {due}, u.t \
            FROM unnest($1::text[], $2::bytea[], $3::jsonb[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::text[]) \
                 AS u(q, p, h, k, c, d, a, t) \
            ON CONFLICT (queue, timer_id) WHERE timer_id IS NOT NULL DO NOTHING \
            RETURNING id), \
         {notify} \
         SELECT ins.id FROM ins CROSS JOIN (SELECT count(*) FROM n) AS woke ORDER BY ins.id",
        o = t.outbox.quoted(),
        due = due("u.d", "u.a"),
        notify = notify_cte(t, "$9::text", "''"),
    )
}

/// Log mode: `$1` prefix, `$2` the content after the version and the id,
/// `$3` the outbox table (quoted), whose id sequence gives the message id,
/// `$4` the outbox table as `outbox_slots` records it. The id is taken in a
/// subquery (`nextval` is volatile, so the subquery is kept as written) and
/// the message emitted once per id.
///
/// Only while a slot is recorded for the table ([`SLOT_READY`]): otherwise
/// no row is returned and nothing is emitted.
pub(crate) fn emit_one() -> String {
    format!(
        "SELECT i.id, pg_logical_emit_message(true, $1::text, '\\x01'::bytea || int8send(i.id) || $2::bytea)::text \
         FROM (SELECT nextval(pg_get_serial_sequence($3::text, 'id')) AS id) AS i WHERE {SLOT_READY}"
    )
}

/// Log mode, many messages: `$2` the contents (bytea[]), emitted in array
/// order (a function scan keeps it), ids taken in the same order; the same
/// condition as [`emit_one`].
pub(crate) fn emit_batch() -> String {
    format!(
        "SELECT i.id, pg_logical_emit_message(true, $1::text, '\\x01'::bytea || int8send(i.id) || i.c)::text \
         FROM (SELECT nextval(pg_get_serial_sequence($3::text, 'id')) AS id, u.c \
               FROM unnest($2::bytea[]) AS u(c)) AS i WHERE {SLOT_READY}"
    )
}

/// A log message is read only by a slot whose consistent point comes
/// before the message's commit; one written while no slot exists, or while
/// the first slot is still being created, is in the WAL and never decoded.
/// `outbox_slots` records a slot once its creation returned, at its
/// consistent point: a statement that sees the record runs after that
/// point, so its transaction commits after it. `$4`: the outbox table as
/// recorded. (Joining `pg_replication_slots` as well, to refuse a slot
/// dropped by hand or lost, cost about 11% of a publish-only transaction's
/// rate; the stream stops on such a slot with its error instead.)
const SLOT_READY: &str = "EXISTS (SELECT 1 FROM outbox_slots WHERE outbox_table = $4::text)";

/// Log mode: messages moved into the table after a failure (or because
/// their key is held), with their ids. `$1` ids, `$2` queues, `$3` payloads,
/// `$4` headers, `$5` keys, `$6` correlation ids, `$7` created (epoch ms),
/// `$8` delays (µs), `$9` attempts so far, `$10` errors, `$11` deliveries
/// (the attempts, and one more for a message that may have crashed its
/// reader: never settled), `$12` the batch's last position, recorded as
/// settled for slot `$13` in `outbox_slots`. A message already there (moved by a run that
/// stopped before it confirmed) is kept as it is.
#[cfg(feature = "capture")]
pub(crate) fn move_from_log(t: &Tables) -> String {
    format!(
        "WITH settled AS (UPDATE outbox_slots SET settled_lsn = $12::text::pg_lsn \
                          WHERE slot_name = $13 AND (settled_lsn IS NULL OR settled_lsn < $12::text::pg_lsn)) \
         INSERT INTO {o} (id, queue, payload, headers, partition_key, correlation_id, created_at, \
                          next_attempt_at, first_attempt_at, last_attempt_at, attempts, deliveries, last_error) \
         SELECT u.id, u.q, u.p, u.h, u.k, u.c, to_timestamp(u.ms / 1000.0), \
                now() + u.d * interval '1 microsecond', \
                CASE WHEN u.a > 0 THEN now() END, CASE WHEN u.a > 0 THEN now() END, u.a, u.n, u.e \
         FROM unnest($1::int8[], $2::text[], $3::bytea[], $4::jsonb[], $5::text[], $6::text[], \
                     $7::int8[], $8::int8[], $9::int4[], $10::text[], $11::int4[]) AS u(id, q, p, h, k, c, ms, d, a, e, n) \
         ON CONFLICT (id) DO NOTHING",
        o = t.outbox.quoted()
    )
}

/// Log mode: messages that failed for good, straight from the stream, into
/// the dead-letter table (or parked in the outbox table without one). `$1`
/// to `$7` as in [`move_from_log`], `$8` reasons, `$9` errors, `$10`
/// attempts.
#[cfg(feature = "capture")]
pub(crate) fn dead_letter_from_log(t: &Tables) -> String {
    let cols = "FROM unnest($1::int8[], $2::text[], $3::bytea[], $4::jsonb[], $5::text[], $6::text[], \
                $7::int8[], $8::text[], $9::text[], $10::int4[]) AS u(id, q, p, h, k, c, ms, r, e, a)";
    match &t.dlq {
        Some(d) => format!(
            "INSERT INTO {d} (original_id, queue, payload, headers, partition_key, correlation_id, \
                              attempts, deliveries, created_at, failure_reason, last_error) \
             SELECT u.id, u.q, u.p, u.h, u.k, u.c, u.a, u.a, to_timestamp(u.ms / 1000.0), u.r, u.e {cols}",
            d = d.quoted()
        ),
        None => format!(
            "INSERT INTO {o} (id, queue, payload, headers, partition_key, correlation_id, created_at, \
                              attempts, deliveries, parked_at, failure_reason, last_error) \
             SELECT CASE WHEN u.id > 0 THEN u.id ELSE nextval(pg_get_serial_sequence('{lit}', 'id')) END, \
                    u.q, u.p, u.h, u.k, u.c, to_timestamp(u.ms / 1000.0), u.a, u.a, now(), u.r, u.e {cols} \
             ON CONFLICT (id) DO NOTHING",
            o = t.outbox.quoted(),
            lit = t.outbox.quoted().replace('\'', "''"),
        ),
    }
}

pub(crate) fn cancel_timer(t: &Tables) -> String {
    format!(
        "DELETE FROM {o} WHERE queue = $1 AND timer_id = $2 AND lease_token IS NULL",
        o = t.outbox.quoted()
    )
}

/// A CTE that turns off `synchronous_commit` for the runtime's own statement
/// (claim, settle, idle marks), which is its own transaction: its commit does
/// not wait for the WAL flush (about 1 ms here, and the tail under load).
/// Safe for at-least-once: a crash can only lose the last few of these
/// commits, and each loss gives a row back (a claim or an ack undone: the row
/// is delivered again) or undoes an attempt count or an idle mark. A delete
/// and its dead-letter insert stay one statement, lost or kept together.
/// `publish` (the user's transaction) is never touched.
const ASYNC_COMMIT: &str = "sc AS (SELECT set_config('synchronous_commit', 'off', true) AS v)";

/// Which rows a claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimScope {
    /// Rows of the one queue `$1` (text), oldest due first.
    Queue,
    /// Rows of the queues in `$1` (text[]), oldest due first.
    Queues,
    /// Rows of the one queue `$1` (text), only the head row of each partition key.
    QueueOrdered,
    /// Rows of the queues in `$1` (text[]), only the head row of each partition key.
    QueuesOrdered,
    /// Every row of the table, by id (the stand-alone relay).
    All,
    /// Every row of the table, by id, only the head row of each partition
    /// key (the relay in log mode, whose table holds the log's failures).
    AllOrdered,
}

/// `$1` the queue (text) for `Queue`/`QueueOrdered`, the queues (text[]) for
/// `Queues`/`QueuesOrdered`; `$2` limit, `$3` lease TTL in µs, `$4` token. For
/// `All` and `AllOrdered`, `$1` and `$5` bound the ids: `$1 < id <= $5`. For `Queue`, `$5` to
/// `$8` bound the claim order: `($5, $6) < (next_attempt_at, id) <= ($7, $8)`.
/// A lease ends at the expiry its claimer chose, whatever TTL a later claimer
/// uses.
///
/// Every form walks an index in the order it claims, so a claim reads about
/// `limit` rows however long the backlog is:
/// * `queue = $1 ... ORDER BY next_attempt_at, id` walks the partial index
///   `due_idx (queue, next_attempt_at, id) WHERE parked_at IS NULL`, from the
///   row comparison's lower bound. (`queue = ANY($1)` cannot give that order
///   on PostgreSQL 15: the planner sorted the whole backlog on every claim,
///   about 160 ms for 200,000 rows.)
/// * several queues: one such index walk per queue (`LATERAL`), merged;
/// * every queue: the primary key, by id.
///
/// The update finds the picked rows by `ctid = ANY(ARRAY(...))`, a TID scan
/// whatever the statistics say. (Joined as `FROM picked WHERE o.id =
/// picked.id`, the generic plan of the prepared statement chose a hash join
/// over a sequential scan of the whole table: 40-50 ms per claim of 500 rows
/// at 100,000 pending. By `id = ANY(...)`, a primary-key descent per row was
/// a quarter of the claim's time.) The `ctid` a row lock returns is the
/// version it locked, the newest (under READ COMMITTED, `FOR UPDATE` follows
/// a concurrent update to it), and no one else can change or remove that
/// version before this statement ends. The update still checks the queue and
/// that no live lease holds the row, so that it can only ever take a row the
/// pick could have taken.
///
/// A claim also stops at `max_bytes` of payload and headers (the rows up to
/// the one that reaches it; at least one row): a batch is held in memory
/// while it is handled, and rows of several MB each would otherwise make a
/// batch of gigabytes. The rows picked beyond it stay unclaimed.
pub(crate) fn claim(t: &Tables, scope: ClaimScope, max_bytes: i64) -> String {
    let o = t.outbox.quoted();
    let pick = |queue_filter: &str, ord: &str, order_by: &str, head_only: bool| {
        let head = if head_only {
            format!(
                "AND (c.partition_key IS NULL OR NOT EXISTS (\
                    SELECT 1 FROM {o} p WHERE p.queue = c.queue AND p.partition_key = c.partition_key \
                    AND p.id < c.id AND p.parked_at IS NULL))"
            )
        } else {
            String::new()
        };
        format!(
            "SELECT c.ctid AS pos, c.{ord} AS ord, c.id, \
                    octet_length(c.payload) + pg_column_size(c.headers) AS size FROM {o} c \
             WHERE {queue_filter} c.parked_at IS NULL AND c.next_attempt_at <= now() \
               AND {claimable} {head} \
             ORDER BY {order_by} LIMIT $2 FOR UPDATE SKIP LOCKED",
            claimable = claimable("c"),
        )
    };
    let picked = match scope {
        ClaimScope::Queue => pick(
            "c.queue = $1::text AND (c.next_attempt_at, c.id) > ($5::timestamptz, $6::int8) \
             AND (c.next_attempt_at, c.id) <= ($7::timestamptz, $8::int8) AND",
            "next_attempt_at",
            "c.next_attempt_at, c.id",
            false,
        ),
        ClaimScope::QueueOrdered => pick("c.queue = $1::text AND", "id", "c.id", true),
        ClaimScope::All | ClaimScope::AllOrdered => pick(
            "c.id > $1::int8 AND c.id <= $5::int8 AND",
            "id",
            "c.id",
            scope == ClaimScope::AllOrdered,
        ),
        ClaimScope::Queues | ClaimScope::QueuesOrdered => {
            let (order, head) = if scope == ClaimScope::Queues {
                ("next_attempt_at", false)
            } else {
                ("id", true)
            };
            format!(
                "SELECT l.pos, l.ord, l.id, l.size FROM unnest($1::text[]) AS q(name) \
                 CROSS JOIN LATERAL ({inner}) AS l ORDER BY l.ord LIMIT $2",
                inner = pick("c.queue = q.name AND", order, &format!("c.{order}"), head)
            )
        }
    };
    let queue_check = match scope {
        ClaimScope::Queue | ClaimScope::QueueOrdered => "o.queue = $1::text AND",
        ClaimScope::Queues | ClaimScope::QueuesOrdered => "o.queue = ANY($1::text[]) AND",
        ClaimScope::All | ClaimScope::AllOrdered => "",
    };
    format!(
        "WITH {ASYNC_COMMIT}, picked AS ({picked}), \
              kept AS (SELECT pos FROM (SELECT pos, size, sum(size) OVER (ORDER BY ord, id) AS upto FROM picked) b \
                       WHERE upto - size < {max_bytes}) \
         UPDATE {o} o SET lease_token = $4, lease_acquired_at = now(), \
             lease_expires_at = now() + $3::int8 * interval '1 microsecond', deliveries = least(o.deliveries, 2147483646) + 1, \
             first_attempt_at = coalesce(o.first_attempt_at, now()), last_attempt_at = now() \
         FROM sc WHERE o.ctid = ANY(ARRAY(SELECT pos FROM kept)) \
           AND {queue_check} o.parked_at IS NULL AND {claimable} \
         RETURNING {RETURNING}",
        claimable = claimable("o"),
    )
}

/// [`claim`] for a pooler in transaction mode: the same statement, with the
/// positions returned as `bytea` (see [`POSITION_AS_BYTES`]).
pub(crate) fn claim_through_pooler(t: &Tables, scope: ClaimScope, max_bytes: i64) -> String {
    claim(t, scope, max_bytes).replacen(POSITION_AS_TID, POSITION_AS_BYTES, 1)
}

/// A row no live lease holds.
fn claimable(alias: &str) -> String {
    format!("({alias}.lease_token IS NULL OR {alias}.lease_expires_at <= now())")
}

/// `$1` positions (`ctid`s), `$2` token, `$3` ids (same order as the
/// positions). The claim returned where it wrote each row; a TID scan per
/// position finds them without a primary-key descent per row. A row updated
/// since (its lease taken over) is at another position and carries another
/// token: it is not deleted. The id is matched as well: after a table
/// rewrite (`VACUUM FULL`, `CLUSTER`, pg_repack, a rewriting `ALTER TABLE`)
/// an old position can address another row of the same batch, which must
/// not be deleted undelivered. Rows not found where the claim left them are
/// then acked by id ([`ack`]).
pub(crate) fn ack_at(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} DELETE FROM {o} o USING unnest($1::tid[], $3::int8[]) AS u(pos, id), sc \
         WHERE o.ctid = u.pos AND o.id = u.id AND o.lease_token = $2",
        o = t.outbox.quoted()
    )
}

/// `$1` ids, `$2` token, `$3` lease TTL in µs: extends the lease of rows still
/// held under `$2`, from now; returns their ids.
pub(crate) fn renew(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} \
         UPDATE {o} o SET lease_expires_at = now() + $3::int8 * interval '1 microsecond' \
         FROM sc WHERE o.id = ANY($1) AND o.lease_token = $2 RETURNING o.id",
        o = t.outbox.quoted()
    )
}

/// `$1` ids, `$2` token.
pub(crate) fn ack(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} DELETE FROM {o} o USING sc WHERE o.id = ANY($1) AND o.lease_token = $2",
        o = t.outbox.quoted()
    )
}

/// `$1` ids, `$2` delays in µs, `$3` errors, `$4` token.
pub(crate) fn nack(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} \
         UPDATE {o} o SET lease_token = NULL, lease_acquired_at = NULL, lease_expires_at = NULL, attempts = least(o.attempts, 2147483646) + 1, \
             next_attempt_at = now() + u.delay_us * interval '1 microsecond', last_error = u.err \
         FROM unnest($1::int8[], $2::int8[], $3::text[]) AS u(id, delay_us, err), sc \
         WHERE o.id = u.id AND o.lease_token = $4",
        o = t.outbox.quoted()
    )
}

/// `$1` ids, `$2` token: gives rows back without counting an attempt, nor
/// the delivery (a row given back was not handled to the end, through no
/// fault of its own; see `max_deliveries`).
pub(crate) fn release(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} \
         UPDATE {o} o SET lease_token = NULL, lease_acquired_at = NULL, lease_expires_at = NULL, \
             deliveries = greatest(o.deliveries - 1, 0) \
         FROM sc WHERE o.id = ANY($1) AND o.lease_token = $2",
        o = t.outbox.quoted()
    )
}

/// `$1` ids, `$2` reasons, `$3` errors, `$4` token: moves rows to the DLQ in the
/// statement that deletes them.
pub(crate) fn dead_letter(t: &Tables, dlq: &crate::TableName) -> String {
    format!(
        "WITH {ASYNC_COMMIT}, d AS (\
            DELETE FROM {o} o USING unnest($1::int8[], $2::text[], $3::text[]) AS u(id, reason, err), sc \
            WHERE o.id = u.id AND o.lease_token = $4 \
            RETURNING o.id, o.queue, o.payload, o.headers, o.partition_key, o.correlation_id, \
                      o.attempts, o.deliveries, o.created_at, u.reason, u.err) \
         INSERT INTO {d} (original_id, queue, payload, headers, partition_key, correlation_id, \
                          attempts, deliveries, created_at, failure_reason, last_error) \
         SELECT id, queue, payload, headers, partition_key, correlation_id, least(attempts, 2147483646) + 1, deliveries, \
                created_at, reason, err FROM d",
        o = t.outbox.quoted(),
        d = dlq.quoted()
    )
}

/// `$1` ids, `$2` reasons, `$3` errors, `$4` token: parks rows (no DLQ
/// configured). A parked timer gives up its `timer_id`, so that a new timer
/// of that id is not swallowed by a row that will never fire.
pub(crate) fn park(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} \
         UPDATE {o} o SET lease_token = NULL, lease_acquired_at = NULL, lease_expires_at = NULL, parked_at = now(), timer_id = NULL, \
             attempts = least(o.attempts, 2147483646) + 1, failure_reason = u.reason, last_error = u.err \
         FROM unnest($1::int8[], $2::text[], $3::text[]) AS u(id, reason, err), sc \
         WHERE o.id = u.id AND o.lease_token = $4",
        o = t.outbox.quoted()
    )
}

/// `$1` listener id, `$2` how long the mark holds, in µs.
pub(crate) fn mark_idle(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} \
         INSERT INTO {l} (listener, idle_until) SELECT $1, now() + $2::int8 * interval '1 microsecond' FROM sc \
         ON CONFLICT (listener) DO UPDATE SET idle_until = excluded.idle_until",
        l = t.outbox.derived("_listeners")
    )
}

/// `$1` listener id.
pub(crate) fn mark_busy(t: &Tables) -> String {
    format!(
        "WITH {ASYNC_COMMIT} DELETE FROM {l} l USING sc WHERE l.listener = $1",
        l = t.outbox.derived("_listeners")
    )
}

/// Columns of a dead letter, as [`crate::dlq::DeadLetter`] reads them.
const DLQ_COLUMNS: &str = concat!(
    "id, original_id, queue, payload, headers, partition_key, correlation_id, attempts, deliveries, ",
    epoch_ms!("created_at"),
    " AS created_at_ms, ",
    epoch_ms!("failed_at"),
    " AS failed_at_ms, failure_reason, last_error"
);

/// The filter of DLQ commands: `$1` queue, `$2` min id, `$3` max id, `$4` since (epoch ms).
const DLQ_FILTER: &str = "($1::text IS NULL OR queue = $1) AND ($2::int8 IS NULL OR id >= $2) \
     AND ($3::int8 IS NULL OR id <= $3) AND ($4::int8 IS NULL OR failed_at >= to_timestamp($4 / 1000.0))";

pub(crate) fn dlq_list(dlq: &crate::TableName) -> String {
    format!(
        "SELECT {DLQ_COLUMNS} FROM {d} WHERE {DLQ_FILTER} ORDER BY id LIMIT $5",
        d = dlq.quoted()
    )
}

pub(crate) fn dlq_count(dlq: &crate::TableName) -> String {
    format!(
        "SELECT count(*) FROM {d} WHERE {DLQ_FILTER}",
        d = dlq.quoted()
    )
}

pub(crate) fn dlq_purge(dlq: &crate::TableName) -> String {
    format!("DELETE FROM {d} WHERE {DLQ_FILTER}", d = dlq.quoted())
}

/// Moves matching dead letters back into the outbox in one statement; `$7`
/// the outbox table's quoted name (for its id sequence). A replayed row keeps
/// its original id (the `outbox-id` header consumers de-duplicate on), unless
/// a row of the outbox holds that id now (a producer that writes ids itself).
pub(crate) fn dlq_replay(t: &Tables, dlq: &crate::TableName) -> String {
    format!(
        "WITH d AS (DELETE FROM {d} WHERE id IN (SELECT id FROM {d} WHERE {DLQ_FILTER} ORDER BY id LIMIT $5) \
                    RETURNING id, original_id, queue, payload, headers, partition_key, correlation_id), \
              ins AS (INSERT INTO {o} (id, queue, payload, headers, partition_key, correlation_id) \
                      SELECT CASE WHEN d.dup > 1 OR EXISTS (SELECT 1 FROM {o} x WHERE x.id = d.original_id) \
                                  THEN nextval(pg_get_serial_sequence($7, 'id')) ELSE d.original_id END, \
                             queue, payload, headers, partition_key, correlation_id \
                      FROM (SELECT d.*, row_number() OVER (PARTITION BY d.original_id ORDER BY d.id) AS dup FROM d) AS d \
                      ORDER BY d.id \
                      RETURNING id), \
              {notify} \
         SELECT ins.id FROM ins CROSS JOIN (SELECT count(*) FROM n) AS woke ORDER BY ins.id",
        d = dlq.quoted(),
        o = t.outbox.quoted(),
        notify = notify_cte(t, "$6::text", "''"),
    )
}

/// Columns of a parked row, as [`crate::dlq::Parked`] reads them.
pub(crate) fn parked_list(t: &Tables) -> String {
    format!(
        "SELECT id, queue, payload, headers, partition_key, correlation_id, attempts, deliveries, \
             {created} AS created_at_ms, {parked} AS parked_at_ms, failure_reason, last_error \
         FROM {o} WHERE parked_at IS NOT NULL AND ($1::text IS NULL OR queue = $1) ORDER BY id LIMIT $2",
        o = t.outbox.quoted(),
        created = epoch_ms!("created_at"),
        parked = epoch_ms!("parked_at"),
    )
}

/// `$1` ids: parked rows become pending again with a fresh retry budget.
pub(crate) fn unpark(t: &Tables) -> String {
    format!(
        "UPDATE {o} SET parked_at = NULL, attempts = 0, deliveries = 0, first_attempt_at = NULL, next_attempt_at = now(), \
             failure_reason = NULL WHERE id = ANY($1) AND parked_at IS NOT NULL",
        o = t.outbox.quoted()
    )
}

/// Per-queue counts: pending, in flight, parked, age of the oldest pending row.
pub(crate) fn queue_stats(t: &Tables) -> String {
    format!(
        "SELECT queue, \
            count(*) FILTER (WHERE parked_at IS NULL AND lease_token IS NULL) AS pending, \
            count(*) FILTER (WHERE parked_at IS NULL AND lease_token IS NOT NULL) AS in_flight, \
            count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked, \
            coalesce(extract(epoch from now() - min(created_at) FILTER (WHERE parked_at IS NULL)), 0)::float8 \
                AS oldest_pending_s \
         FROM {o} GROUP BY queue ORDER BY queue",
        o = t.outbox.quoted()
    )
}

/// The isolation level a statement of this session runs at by default.
pub(crate) const ISOLATION: &str = "SELECT current_setting('transaction_isolation')";

/// Claims assume READ COMMITTED: a row lock follows a concurrent update to
/// the row's newest version instead of failing.
pub(crate) const SET_READ_COMMITTED: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// Readiness probe of the metrics endpoint.
#[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
pub(crate) const PING: &str = "SELECT 1";

/// `$1` quoted table name: whether it exists.
pub(crate) const TABLE_EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";

/// The database clock in ms since the Unix epoch (`--since` is measured on it).
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) const NOW_MS: &str = "SELECT (extract(epoch from now()) * 1000)::int8";

/// Dead letters per queue.
pub(crate) fn dlq_count_by_queue(dlq: &crate::TableName) -> String {
    format!(
        "SELECT queue, count(*) FROM {d} GROUP BY queue ORDER BY queue",
        d = dlq.quoted()
    )
}

/// `$1` quoted table name: its columns (name, type, not null), in order.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) const TABLE_COLUMNS: &str =
    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull \
     FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
     AND NOT a.attisdropped ORDER BY a.attnum";

/// `$1` quoted table name: the names of its indexes.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) const TABLE_INDEXES: &str = "SELECT c.relname::text FROM pg_index i \
     JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass($1) ORDER BY 1";

/// `$1` quoted table name: its storage options (`autovacuum_vacuum_scale_factor=0.01`, ...).
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) const TABLE_OPTIONS: &str =
    "SELECT coalesce(c.reloptions, '{}'::text[]) FROM pg_class c WHERE c.oid = to_regclass($1)";

/// `$1` table name as recorded by the migrations: the highest version applied per kind.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) const APPLIED_VERSIONS: &str =
    "SELECT kind, max(version) FROM outbox_migrations WHERE table_name = $1 GROUP BY kind";

/// `$1`..`$4` the DLQ filter: how many dead letters match, and the highest id.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn dlq_span(dlq: &crate::TableName) -> String {
    format!(
        "SELECT count(*), max(id) FROM {d} WHERE {DLQ_FILTER}",
        d = dlq.quoted()
    )
}

/// `$1` ids, `$2` queue or NULL, `$3` limit: which of these rows are parked.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn parked_ids(t: &Tables) -> String {
    format!(
        "SELECT id FROM {o} WHERE parked_at IS NOT NULL AND id = ANY($1) \
         AND ($2::text IS NULL OR queue = $2) ORDER BY id LIMIT $3",
        o = t.outbox.quoted()
    )
}
