//! Parameter types for `pgbouncer=true`.
//!
//! In PgBouncer's transaction mode a named prepared statement may be created
//! on one server connection and executed on another, so every statement must
//! travel as one unnamed Parse/Bind/Execute. tokio-postgres can do that
//! (`query_typed`) but only when told each parameter's PostgreSQL type, which
//! a prepared statement would otherwise have told it. Nothing in
//! tokio-postgres maps a Rust value to its natural type, so this does: it asks
//! each value which of the common types it can encode as, in order of
//! preference, the way an ORM binds a Rust type to a PostgreSQL type.

use bytes::BytesMut;
use tokio_postgres::types::{ToSql, Type};

/// Shorthand used across the crate for statement parameters.
pub type Param<'a> = &'a (dyn ToSql + Sync);

/// Candidate types, most specific first. `String` accepts TEXT before the
/// exotic text-like types; integers pick their exact width; `None` values
/// take the first type their `Option<T>` accepts.
const CANDIDATES: &[Type] = &[
    Type::INT8,
    Type::INT4,
    Type::INT2,
    Type::FLOAT8,
    Type::FLOAT4,
    Type::BOOL,
    Type::TEXT,
    Type::BYTEA,
    Type::JSONB,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::TIME,
    Type::UUID,
    Type::NUMERIC,
    Type::INET,
    Type::CHAR,
    Type::OID,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::INT4_ARRAY,
    Type::INT2_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::BOOL_ARRAY,
    Type::BYTEA_ARRAY,
    Type::UUID_ARRAY,
    Type::JSONB_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
];

/// The PostgreSQL type of each parameter, or the 1-based position of the
/// first one whose type cannot be told.
pub(crate) fn infer_types<'a>(params: &[Param<'a>]) -> Result<Vec<(Param<'a>, Type)>, usize> {
    let mut buf = BytesMut::new();
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            CANDIDATES
                .iter()
                .find(|ty| {
                    buf.clear();
                    p.to_sql_checked(ty, &mut buf).is_ok()
                })
                .map(|ty| (*p, ty.clone()))
                .ok_or(i + 1)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn natural_types_are_inferred() {
        let (a, b, c, d, e): (i64, i32, String, &str, bool) = (1, 2, "x".into(), "y", true);
        let none: Option<String> = None;
        let bytes: Vec<u8> = vec![1, 2];
        let list: Vec<String> = vec!["a".into()];
        let json = serde_json::json!({"k": 1});
        let params: Vec<Param> = vec![&a, &b, &c, &d, &e, &none, &bytes, &list, &json];
        let types: Vec<Type> = infer_types(&params)
            .unwrap()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        assert_eq!(
            types,
            vec![
                Type::INT8,
                Type::INT4,
                Type::TEXT,
                Type::TEXT,
                Type::BOOL,
                Type::TEXT,
                Type::BYTEA,
                Type::TEXT_ARRAY,
                Type::JSONB
            ]
        );
    }
}
