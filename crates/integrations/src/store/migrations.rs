//! Schema migrations: numbered SQL files in `migrations/`, embedded in the
//! binary and applied with refinery.

use db_pool::Pool;

#[allow(missing_docs)]
mod embedded {
    refinery::embed_migrations!("migrations");
}

/// What applying the migrations did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Names of the migrations applied now (empty when up to date).
    pub applied: Vec<String>,
}

/// Applies every migration not yet applied, through a pooled connection.
/// Concurrent starts are serialised by an advisory lock.
pub async fn run(pool: &Pool) -> anyhow::Result<Applied> {
    let mut conn = pool.get().await?;
    // One instance migrates at a time; the others wait, then find nothing to do.
    conn.batch_execute("SELECT pg_advisory_lock(7366432001)")
        .await?;
    let report = embedded::migrations::runner()
        .set_abort_divergent(true)
        .run_async(conn.raw_client())
        .await;
    conn.batch_execute("SELECT pg_advisory_unlock(7366432001)")
        .await?;
    let report = report.map_err(migration_error)?;
    Ok(Applied {
        applied: report
            .applied_migrations()
            .iter()
            .map(|m| m.to_string())
            .collect(),
    })
}

/// Applies the migrations on a connection of their own to `config`'s
/// server (`DIRECT_URL`: not through a pooler), closed afterwards.
pub async fn run_on(config: &db_pool::PoolConfig) -> anyhow::Result<Applied> {
    let mut config = config.clone();
    config.connection_limit = 1;
    let pool = Pool::new(config)?;
    let applied = run(&pool).await;
    pool.close(std::time::Duration::from_secs(5)).await;
    applied
}

/// refinery's error quotes the server's error whole, DETAIL included, which
/// can hold row values (a constraint added over existing rows names the
/// failing row): keep refinery's context, the SQLSTATE and the message.
fn migration_error(e: refinery::Error) -> anyhow::Error {
    let refinery::error::Kind::Connection(context, source) = e.kind() else {
        return anyhow::anyhow!("{e}");
    };
    match source
        .downcast_ref::<db_pool::tokio_postgres::Error>()
        .and_then(|e| e.as_db_error())
    {
        Some(db) => anyhow::anyhow!(
            "{context}: the server refused it ({}): {}",
            db.code().code(),
            db.message()
        ),
        // Not a server error (a closed connection...): no row values.
        None => anyhow::anyhow!("{context}: {source}"),
    }
}
