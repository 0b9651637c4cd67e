//! Engine benchmark: claim -> no-op handler -> ack, beside a plain-SQL
//! claim+delete loop on the same rows, in one run. Prints figures; asserts nothing.
//!
//! ```text
//! cargo run --release --example engine_bench -- [rows] [batch] [workers] [both|engine|plain]
//! ```
//! Defaults: 200,000 rows, batch 500, 2 workers, both measurements (one alone
//! is for profiling: `perf record -a -g` sees only that phase). Uses a scratch database
//! `outbox_engine_bench` next to `DATABASE_URL`'s.

use outbox::{App, Context, Envelope, Message, Outbox, Output, Subscriber, Tables};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let cut = base.rfind('/').unwrap_or(base.len());
    format!("{}/{db}{query}", &base[..cut])
}

async fn load(pool: &PgPool, rows: usize) {
    let payload = serde_json::json!({"order_id": 0, "customer": "c-000000", "items": [{"sku": "sku-00000", "qty": 1, "price_cents": 1999}], "note": "x".repeat(80)});
    let ob = Outbox::default();
    let mut i = 0;
    while i < rows {
        let n = (rows - i).min(5_000);
        let msgs = (i..i + n)
            .map(|k| {
                Message::json("bench", &payload)
                    .unwrap()
                    .key(format!("key-{}", k % 100))
            })
            .collect();
        ob.publish_batch(pool, msgs).await.unwrap();
        i += n;
    }
    pool.execute("VACUUM ANALYZE outbox").await.unwrap();
}

async fn pending(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = arg(1, 200_000);
    let batch = arg(2, 500);
    let workers = arg(3, 2);
    let phase = std::env::args().nth(4).unwrap_or_else(|| "both".into());
    if !["both", "engine", "plain"].contains(&phase.as_str()) {
        return Err(format!("unknown phase {phase:?} (accepted: both, engine, plain)").into());
    }
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:5432/outbox".into());
    let admin = PgPool::connect(&url).await?;
    admin
        .execute("DROP DATABASE IF EXISTS outbox_engine_bench WITH (FORCE)")
        .await?;
    admin.execute("CREATE DATABASE outbox_engine_bench").await?;
    let pool = PgPoolOptions::new()
        .max_connections(workers as u32 * 2 + 4)
        .connect(&with_database(&url, "outbox_engine_bench"))
        .await?;
    outbox::migrate(&pool, &Tables::default()).await?;

    // Plain SQL ceiling: one statement claims and deletes a batch.
    let mut plain = f64::NAN;
    if phase != "engine" {
        load(&pool, rows).await;
        let sql = "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE queue = $1 AND parked_at IS NULL \
               AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
               RETURNING id, payload";
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let got = sqlx::query(sql)
                        .bind("bench")
                        .bind(batch as i64)
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                    if got.is_empty() {
                        break;
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        plain = rows as f64 / t.elapsed().as_secs_f64();
    }

    // The engine: lease claim, no-op handler, batched ack.
    let mut engine = f64::NAN;
    if phase != "plain" {
        load(&pool, rows).await;
        eprintln!("engine phase starts");
        // The handler counts its calls, so that the end of the run is found
        // without scanning the table while it drains (a count(*) every few ms
        // costs PostgreSQL more than the claims it measures).
        let handled = Arc::new(AtomicUsize::new(0));
        let calls = handled.clone();
        let noop = move |_env: Arc<Envelope>, _ctx: Context| {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Ok(Output::none()) }
        };
        let sub = Subscriber::new("bench", noop)
            .queue("bench")
            .batch_size(batch)
            .concurrency(batch)
            .workers(workers)
            .poll_interval(Duration::from_millis(5), Duration::from_millis(20));
        let t = Instant::now();
        let running = App::manual(pool.clone()).register(sub).start().await?;
        while handled.load(Ordering::Relaxed) < rows {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The last batch's ack.
        while pending(&pool).await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let engine_secs = t.elapsed().as_secs_f64();
        running.shutdown().await;
        engine = rows as f64 / engine_secs;
    }

    println!("| mode | rows | batch | workers | rows/s |");
    println!("|---|---|---|---|---|");
    println!("| plain SQL claim+delete | {rows} | {batch} | {workers} | {plain:.0} |");
    println!(
        "| outbox engine claim -> no-op -> ack | {rows} | {batch} | {workers} | {engine:.0} |"
    );
    println!("engine / plain SQL = {:.2}", engine / plain);
    pool.close().await;
    admin
        .execute("DROP DATABASE IF EXISTS outbox_engine_bench WITH (FORCE)")
        .await?;
    Ok(())
}
