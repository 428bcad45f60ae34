//! Successful refreshes are written back in batches: one statement for
//! every result that finished while the previous statement ran (a group
//! commit), so at hundreds of refreshes a second the database sees a few
//! statements a second, not one per token.
//!
//! No background task: whoever finds results queued and the writer free
//! writes them all, and hands each its row's new state. A writer cancelled
//! mid-statement (its caller gone) drops the answers it owed; each of
//! those callers then writes its own result alone (the lease condition
//! makes a second write of a committed result a no-op, read as "lease
//! lost").

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::IntegrationsService;
use crate::domain::IntegrationStatus;
use crate::store::integrations::{self as rows, Refreshed};

/// The most results one statement writes.
const MAX_BATCH: usize = 256;

type Answer = Result<Option<IntegrationStatus>, Arc<db_pool::Error>>;

/// Results waiting for a writer, and the writer's turn.
#[derive(Default)]
pub(super) struct WriteBack {
    queue: Mutex<Vec<(Arc<Refreshed>, oneshot::Sender<Answer>)>>,
    writer: tokio::sync::Mutex<()>,
}

impl IntegrationsService {
    /// Stores a successful refresh (with others finished meanwhile) and
    /// gives its lease back. `None`: the lease was lost before the write
    /// (another instance took the row over).
    pub(super) async fn write_back(
        &self,
        result: Refreshed,
    ) -> Result<Option<IntegrationStatus>, Arc<db_pool::Error>> {
        let result = Arc::new(result);
        let (tx, mut rx) = oneshot::channel();
        self.writes
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((result.clone(), tx));
        loop {
            let turn = self.writes.writer.lock().await;
            match rx.try_recv() {
                Ok(answer) => return answer,
                Err(oneshot::error::TryRecvError::Closed) => {
                    drop(turn);
                    return self
                        .write_batch(&[&result])
                        .await
                        .map(|mut m| m.remove(&result.id));
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch: Vec<_> = {
                let mut queue = self
                    .writes
                    .queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                // Not queued and not answered: cannot happen while we hold
                // the writer's turn; written alone rather than waited for.
                drop(turn);
                return self
                    .write_batch(&[&result])
                    .await
                    .map(|mut m| m.remove(&result.id));
            }
            let items: Vec<&Refreshed> = batch.iter().map(|(r, _)| r.as_ref()).collect();
            metrics::counter!("integrations_refresh_result_writes_total").increment(1);
            let written = self.write_batch(&items).await;
            match written {
                Ok(states) => {
                    for (item, reply) in batch {
                        let _ = reply.send(Ok(states.get(&item.id).cloned()));
                    }
                }
                // One result the database refuses (not a passing failure)
                // must not cost the others theirs (a rotated refresh token
                // lost is a revoked integration): each is written alone.
                Err(e) if !e.is_transient() && batch.len() > 1 => {
                    tracing::warn!(error = %e, results = batch.len(), "writing refresh results together failed; writing them one by one");
                    for (item, reply) in batch {
                        let answer = self
                            .write_batch(&[item.as_ref()])
                            .await
                            .map(|mut states| states.remove(&item.id));
                        let _ = reply.send(answer);
                    }
                }
                Err(e) => {
                    for (_, reply) in batch {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
            // The answers are sent before the turn is given up: a caller
            // whose result was in this batch finds it when it gets the turn.
            drop(turn);
            if let Ok(answer) = rx.try_recv() {
                return answer;
            }
        }
    }

    /// One statement for a batch, tried again on a passing database
    /// failure (a rotated refresh token must not be lost).
    async fn write_batch(
        &self,
        batch: &[&Refreshed],
    ) -> Result<std::collections::HashMap<i64, IntegrationStatus>, Arc<db_pool::Error>> {
        let owner = self.config.instance_id.as_str();
        self.store_with_retry(|mut conn| async move {
            rows::store_refreshed(&mut conn, owner, batch).await
        })
        .await
        .map_err(Arc::new)
    }
}
