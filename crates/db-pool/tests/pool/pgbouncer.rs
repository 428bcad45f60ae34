//! pgbouncer=true through a real PgBouncer in transaction mode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use db_pool::testing::TestDatabase;

use crate::common::pool_url;

/// Runs a mixed, concurrent load through PgBouncer; returns the errors.
async fn load(url: String) -> Vec<String> {
    let pool = pool_url(&url);
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let (pool, errors, done) = (pool.clone(), errors.clone(), done.clone());
            tokio::spawn(async move {
                for i in 0..40i64 {
                    let result = async {
                        let mut conn = pool.get().await?;
                        let name = format!("task{task}");
                        let none: Option<String> = None;
                        let row = conn
                            .query_one(
                                "SELECT $1::int8 + 1, $2::text, $3::text IS NULL",
                                &[&i, &name, &none],
                            )
                            .await?;
                        assert_eq!(row.get::<_, i64>(0), i + 1);
                        let n = conn
                            .execute("SELECT * FROM generate_series(1, $1)", &[&(task + 1)])
                            .await?;
                        assert_eq!(n, u64::try_from(task).unwrap() + 1);
                        let mut tx = conn.transaction().await?;
                        tx.query("SELECT $1::int4", &[&(i as i32)]).await?;
                        tx.commit().await?;
                        Ok::<_, db_pool::Error>(())
                    }
                    .await;
                    if let Err(e) = result {
                        errors.lock().unwrap().push(e.to_string());
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 16 * 40);
    let errors = errors.lock().unwrap().clone();
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_transaction_mode_under_concurrent_load_has_no_prepared_statement_errors() {
    let db = TestDatabase::create().await;
    // 2 server connections for 10 client connections: statements of
    // different clients interleave on the same server connections.
    let bouncer = db_pool::testing::PgBouncer::start(&db.url, "transaction", 2).await;
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{}?sslmode=disable&connection_limit=10",
        bouncer.port, db.name
    );

    let errors = load(format!("{url}&pgbouncer=true")).await;
    assert!(errors.is_empty(), "with pgbouncer=true: {errors:?}");

    // The control: named prepared statements do break in transaction mode,
    // so the load above really exercised the problem.
    let errors = load(format!("{url}&pgbouncer=false")).await;
    assert!(
        errors
            .iter()
            .any(|e| e.contains("prepared statement") || e.contains("26000")),
        "expected the named-statement control to fail through PgBouncer: {errors:?}"
    );
}
