//! The `events` table: the outbox the triggers of migration V6 write in
//! the same transaction as each change of `integrations`.
//!
//! # The cursor
//!
//! A poller must never skip an event. Ids (a sequence) alone cannot promise
//! that: ids are taken when a row is written, not when its transaction
//! commits, so a transaction holding id 10 can commit after one holding id
//! 11, and a poller that already read 11 and moved its cursor there would
//! never see 10. Every event therefore also keeps its writing transaction's
//! id (`txid`, `pg_current_xact_id()`, 64 bits, never wraps), and a page
//! holds only events of transactions below the reading statement's
//! snapshot `xmin` (`pg_snapshot_xmin(pg_current_snapshot())`): the oldest
//! transaction still running. Every transaction below it has ended, so its
//! events are all visible now or never will be (it rolled back), and every
//! transaction that writes later gets a larger txid. Pages are ordered by
//! `(txid, id)` and the cursor is the last `(txid, id)` returned: nothing
//! can appear before it afterwards, on this instance or any other (they
//! all read the one database). The price: an event shows once every
//! transaction that started writing before it has ended, so a long-running
//! write transaction delays (never loses) the events behind it.
//!
//! An event's `txid` may be raised to its integration's previous event's
//! (migration V6, `integrations_event_position`), so one integration's
//! events keep their order; never below its own transaction's id, so the
//! argument above holds for it unchanged.
//!
//! A page that is not full has seen every event below the horizon, so its
//! next cursor moves to `(xmin, 0)`: an empty poll still advances, and the
//! next one starts its index scan there (with a type filter, past every
//! event of other types).

use chrono::{DateTime, Utc};
use db_pool::{Conn, Error, Row};

use crate::domain::{Event, EventCursor, EventData, EventError, EventType, Status};

/// The columns of an [`Event`], in [`event_from_row`]'s order (after the
/// horizon).
macro_rules! event_columns {
    () => {
        "e.id, e.txid::text, e.type, e.created_at, e.user_id, e.provider, e.account_id, \
         e.status, e.previous_status, e.refresh_failures, e.error_code, e.error_message, \
         e.expires_at"
    };
}
pub(crate) use event_columns;

// The page statement, defined once; `$filter` narrows the events (two
// statements rather than one with `$4 IS NULL OR type = $4`, so each gets
// a plan on its own index).
macro_rules! page {
    ($filter:literal) => {
        concat!(
            "SELECT h.xmin::text, ",
            event_columns!(),
            " FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) h \
             LEFT JOIN LATERAL ( \
               SELECT * FROM events \
               WHERE ",
            $filter,
            "(txid, id) > (CAST($1::text AS xid8), $2::bigint) AND txid < h.xmin \
               ORDER BY txid, id LIMIT $3) e ON true \
             ORDER BY e.txid, e.id"
        )
    };
}

/// A page of events after a cursor, of every type. Public so the index
/// test EXPLAINs the statement the product runs. $1, $2: the cursor (txid
/// as text: `xid8` has no binary form the driver knows), $3: the limit.
/// One statement, so the horizon and the rows come from one snapshot (a
/// later snapshot's horizon could pass events this one did not see). The
/// lateral subquery yields the horizon's row even when no event qualifies.
pub const PAGE: &str = page!("");

/// [`PAGE`] of one type ($4).
pub const PAGE_OF_TYPE: &str = page!("type = $4::text AND ");

/// A page of events and where the next one starts.
#[derive(Debug)]
pub struct Page {
    /// The events, in cursor order (without those of a type this version
    /// does not know, written by a newer one).
    pub events: Vec<Event>,
    /// How many events were read, known or not: the page is full when
    /// they reach the limit.
    pub read: usize,
    /// The position of the last event read.
    pub last: Option<EventCursor>,
    /// The horizon: every transaction below it had ended.
    pub horizon: u64,
}

/// Up to `limit` events after `after` (of type `kind` when given), of
/// transactions that had all ended, in `(txid, id)` order.
pub async fn page(
    conn: &mut Conn,
    after: EventCursor,
    limit: i64,
    kind: Option<EventType>,
) -> Result<Page, Error> {
    let txid = after.txid.to_string();
    let rows = match kind {
        None => conn.query(PAGE, &[&txid, &after.id, &limit]).await?,
        Some(kind) => {
            conn.query(PAGE_OF_TYPE, &[&txid, &after.id, &limit, &kind.as_str()])
                .await?
        }
    };
    let horizon = rows
        .first()
        .and_then(|r| r.get::<_, Option<&str>>(0))
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let read: Vec<_> = rows.iter().filter_map(event_from_row).collect();
    Ok(Page {
        read: read.len(),
        last: read.last().map(|(cursor, _)| *cursor),
        events: read.into_iter().filter_map(|(_, event)| event).collect(),
        horizon,
    })
}

/// The position and event of a row whose columns 1 to 13 are
/// [`event_columns`] (a page's, after the horizon; a claimed delivery's,
/// after its id); `None` for the horizon's row alone (no event), and no
/// event for a type this version does not know.
pub(crate) fn event_from_row(row: &Row) -> Option<(EventCursor, Option<Event>)> {
    let id: i64 = row.get::<_, Option<i64>>(1)?;
    let txid: u64 = row.get::<_, Option<&str>>(2)?.parse().ok()?;
    let cursor = EventCursor { txid, id };
    let Some(kind) = EventType::from_db(row.get(3)) else {
        return Some((cursor, None));
    };
    let status = |i: usize| row.get::<_, Option<&str>>(i).map(Status::from_db);
    let error = match (
        row.get::<_, Option<String>>(11),
        row.get::<_, Option<String>>(12),
    ) {
        (Some(code), Some(message)) => Some(EventError { code, message }),
        _ => None,
    };
    Some((
        cursor,
        Some(Event {
            id,
            kind,
            created_at: row.get::<_, DateTime<Utc>>(4),
            data: EventData {
                user_id: row.get(5),
                provider: row.get(6),
                account_id: row.get(7),
                status: status(8),
                previous_status: status(9),
                refresh_failures: row.get(10),
                error,
                expires_at: row.get(13),
            },
        }),
    ))
}

/// The retention purge: the oldest `$2` events written before `$1`
/// seconds ago. Rows another instance's purge is deleting are skipped,
/// not waited for. Public so the index test EXPLAINs the statement the
/// product runs.
pub const PURGE: &str = "DELETE FROM events WHERE id IN ( \
       SELECT id FROM events WHERE created_at < now() - make_interval(secs => $1) \
       ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Deletes up to `batch` events older than `older_than_secs`; how many.
pub async fn purge(conn: &mut Conn, older_than_secs: f64, batch: i64) -> Result<u64, Error> {
    conn.execute(PURGE, &[&older_than_secs, &batch]).await
}

/// The latest `limit` events written, newest first (for the dashboard; a
/// poller pages with the cursor instead).
pub async fn latest(conn: &mut Conn, limit: i64) -> Result<Vec<Event>, Error> {
    const LATEST: &str = concat!(
        "SELECT NULL::text, ",
        event_columns!(),
        " FROM events e ORDER BY e.id DESC LIMIT $1"
    );
    Ok(conn
        .query(LATEST, &[&limit])
        .await?
        .iter()
        .filter_map(event_from_row)
        .filter_map(|(_, event)| event)
        .collect())
}
