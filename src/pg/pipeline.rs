//! The tenant path's protocol work: a tenant connection (a tokio-postgres
//! client and its prepared statements) and the pipeline that sends a
//! statement with what must come before it (BEGIN and the tenant's context)
//! and after it (the end of a read) in one write, so that one statement
//! costs one round trip. What to send is decided by the router; this
//! module only keeps it in order.
//!
//! tokio-postgres sends a request when its future is first polled and
//! hands its answers over a channel of one message: requests sent together
//! must be awaited together, or the connection waits for a reader that
//! never comes. So the parts of a pipeline are joined (polled in order,
//! each until it ends), and a statement's rows are read to the end inside
//! its part.
//!
//! Errors come back as `sqlx::Error`, the error the rest of the crate (its
//! constraint mapping, its dead-connection retries) already understands.

use std::borrow::Cow;
use std::num::NonZeroUsize;

use futures_util::{future, pin_mut, TryStreamExt};
use tokio_postgres::types::{FromSqlOwned, ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::base::lsn::Lsn;

pub use tokio_postgres::Row;

/// One tenant connection: the client and the statements prepared on it.
pub struct TenantConnection {
    client: Client,
    /// By text: the parameter types it was prepared with, and the statement.
    /// The least recently used goes first when it is full (dropping a
    /// statement closes it on the server). `None`: nothing is kept.
    statements: Option<StatementCache>,
}

/// Prepared statements by text, with the parameter types each was
/// prepared with.
type StatementCache = lru::LruCache<Box<str>, (Box<[Type]>, Statement)>;

impl TenantConnection {
    pub fn new(client: Client, capacity: usize) -> Self {
        TenantConnection {
            client,
            statements: NonZeroUsize::new(capacity).map(lru::LruCache::new),
        }
    }

    /// The client itself, for tests and tools that inspect a pooled
    /// connection between transactions. Tenant code never gets one: its
    /// transactions hold their connection privately.
    #[doc(hidden)]
    pub fn probe_client(&self) -> &Client {
        &self.client
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn cached(&mut self, sql: &str, types: &[Type]) -> Option<Statement> {
        match self.statements.as_mut()?.get(sql) {
            Some((prepared_for, st)) if **prepared_for == *types => Some(st.clone()),
            _ => None,
        }
    }

    fn remember(&mut self, sql: &str, types: &[Type], st: &Statement) {
        if let Some(statements) = self.statements.as_mut() {
            statements.put(sql.into(), (types.into(), st.clone()));
        }
    }

    /// Sends `sql` with its parameters, after the simple-query text
    /// `before` and before `after` when given, all in one write when the
    /// statement is unnamed or already prepared here (a first use of a
    /// named statement prepares it after `before`, which it may need: one
    /// more round trip). Returns the rows and the count of rows affected;
    /// the error of `before` wins over the statement's, which wins over
    /// `after`'s. With `position`, the WAL insert position is read right
    /// after `after` (a COMMIT), in the same write (see [`Sent::position`]).
    ///
    /// `named`: prepare the statement once on this connection and keep it
    /// (up to the capacity), or send it unnamed each time.
    pub async fn send(
        &mut self,
        before: Option<&str>,
        sql: &str,
        params: &[(Box<dyn ToSql + Sync + Send + '_>, Type)],
        named: bool,
        after: Option<&str>,
        position: bool,
    ) -> Result<Sent, sqlx::Error> {
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let named = named && self.statements.is_some();
        let mut before = before;
        let mut statement = None;
        if named {
            statement = self.cached(sql, &types);
            if statement.is_none() {
                let client = &self.client;
                let (begun, prepared) = future::join(
                    simple(client, before.take()),
                    client.prepare_typed(sql, &types),
                )
                .await;
                begun?;
                let st = prepared.map_err(driver_error)?;
                self.remember(sql, &types, &st);
                statement = Some(st);
            }
        }
        let client = &self.client;
        let values = params.iter().map(|(v, _)| &**v as &(dyn ToSql + Sync));
        let rows = async {
            let stream = match &statement {
                Some(st) => client.query_raw(st, values).await,
                None => {
                    let typed = values.zip(types.iter().cloned());
                    client.query_typed_raw(sql, typed).await
                }
            }
            .map_err(driver_error)?;
            pin_mut!(stream);
            let mut rows = Vec::new();
            while let Some(row) = stream.try_next().await.map_err(driver_error)? {
                rows.push(row);
            }
            let rows_affected = stream.rows_affected().unwrap_or(0);
            Ok::<_, sqlx::Error>(Sent {
                rows,
                rows_affected,
                position: None,
            })
        };
        let end = async {
            match (after, position) {
                (Some(after), true) => ended_at(client, after).await,
                _ => simple(client, after).await.map(|()| None),
            }
        };
        let (begun, sent, ended) = future::join3(simple(client, before), rows, end).await;
        begun?;
        let mut sent = sent?;
        sent.position = ended?;
        Ok(sent)
    }

    /// Sends the simple-query text `sql` alone (COMMIT, ROLLBACK).
    pub async fn execute_simple(&self, sql: &str) -> Result<(), sqlx::Error> {
        simple(&self.client, Some(sql)).await
    }

    /// Sends `sql` (a COMMIT) and reads the WAL insert position after it,
    /// in one message (see [`Sent::position`]).
    pub async fn execute_at_position(&self, sql: &str) -> Result<Option<Lsn>, sqlx::Error> {
        ended_at(&self.client, sql).await
    }
}

/// What a statement returned.
pub struct Sent {
    pub rows: Vec<Row>,
    pub rows_affected: u64,
    /// When asked for: the WAL insert position read after the COMMIT that
    /// followed the statement. It is at or past the commit record, so a
    /// replica that has replayed up to it sees the transaction. `None`:
    /// not asked for, or it could not be read.
    pub position: Option<Lsn>,
}

/// Runs `sql` (a COMMIT), then reads the WAL insert position in a message
/// of its own, in the same write: `sql`'s error is the result; a position
/// that cannot be read is `None` (the caller must then assume the worst),
/// never a failed commit.
async fn ended_at(client: &Client, sql: &str) -> Result<Option<Lsn>, sqlx::Error> {
    let (ended, position) = future::join(
        simple(client, Some(sql)),
        client.simple_query("SELECT pg_current_wal_insert_lsn()::text"),
    )
    .await;
    ended?;
    let position = match position {
        Ok(messages) => messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                row.get(0).and_then(|t| Lsn::parse(t).ok())
            }
            _ => None,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the WAL position after a commit");
            None
        }
    };
    Ok(position)
}

async fn simple(client: &Client, sql: Option<&str>) -> Result<(), sqlx::Error> {
    match sql {
        Some(sql) => client.batch_execute(sql).await.map_err(driver_error),
        None => Ok(()),
    }
}

/// A tokio-postgres error as the sqlx error the crate maps: a server error
/// keeps its SQLSTATE, constraint and message; a closed or broken
/// connection is an I/O error (so it counts as a dead connection).
pub fn driver_error(e: tokio_postgres::Error) -> sqlx::Error {
    if let Some(db) = e.as_db_error() {
        return sqlx::Error::Database(Box::new(ServerError(db.clone())));
    }
    let kind = if e.is_closed() {
        std::io::ErrorKind::ConnectionAborted
    } else {
        std::io::ErrorKind::Other
    };
    sqlx::Error::Io(std::io::Error::new(kind, e))
}

/// An error PostgreSQL reported, for sqlx's error type.
#[derive(Debug)]
struct ServerError(tokio_postgres::error::DbError);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
}

impl std::error::Error for ServerError {}

impl sqlx::error::DatabaseError for ServerError {
    fn message(&self) -> &str {
        self.0.message()
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self.0.code().code()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn constraint(&self) -> Option<&str> {
        self.0.constraint()
    }

    fn table(&self) -> Option<&str> {
        self.0.table()
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use sqlx::error::ErrorKind;
        match self.0.code().code() {
            "23505" => ErrorKind::UniqueViolation,
            "23503" => ErrorKind::ForeignKeyViolation,
            "23502" => ErrorKind::NotNullViolation,
            "23514" => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// A value a tenant statement can take as a parameter, with the type it
/// is sent as (statements are parsed with their parameters' types, as
/// sqlx does, so `$1` compared to an `int4` column may be an `i64`).
pub trait TenantParam: ToSql + Sync + Send {
    fn pg_type() -> Type
    where
        Self: Sized;
}

macro_rules! tenant_params {
    ($($rust:ty => $pg:expr),* $(,)?) => {
        $(impl TenantParam for $rust {
            fn pg_type() -> Type {
                $pg
            }
        })*
    };
}

tenant_params! {
    bool => Type::BOOL,
    i16 => Type::INT2,
    i32 => Type::INT4,
    i64 => Type::INT8,
    f32 => Type::FLOAT4,
    f64 => Type::FLOAT8,
    String => Type::TEXT,
    &str => Type::TEXT,
    Vec<u8> => Type::BYTEA,
    uuid::Uuid => Type::UUID,
    time::OffsetDateTime => Type::TIMESTAMPTZ,
    time::PrimitiveDateTime => Type::TIMESTAMP,
    time::Date => Type::DATE,
}

impl<T: TenantParam> TenantParam for Option<T> {
    fn pg_type() -> Type {
        T::pg_type()
    }
}

impl<T: TenantParam> TenantParam for &T {
    fn pg_type() -> Type {
        T::pg_type()
    }
}

/// A row type of tenant queries ([`tenant_row!`](crate::tenant_row) for
/// structs; tuples of column types by position).
pub trait FromTenantRow: Sized {
    fn from_row(row: &Row) -> Result<Self, sqlx::Error>;
}

/// Column `name` of `row`, for [`FromTenantRow`] implementations.
pub fn column<T: FromSqlOwned>(row: &Row, name: &str) -> Result<T, sqlx::Error> {
    row.try_get(name).map_err(|e| decode_error(name, e))
}

fn decode_error(index: &str, e: tokio_postgres::Error) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: index.to_owned(),
        source: Box::new(e),
    }
}

macro_rules! tuple_rows {
    ($(($($t:ident $i:tt),+))*) => {
        $(impl<$($t: FromSqlOwned),+> FromTenantRow for ($($t,)+) {
            fn from_row(row: &Row) -> Result<Self, sqlx::Error> {
                Ok(($(row
                    .try_get::<_, $t>($i)
                    .map_err(|e| decode_error(stringify!($i), e))?,)+))
            }
        })*
    };
}

tuple_rows! {
    (A 0)
    (A 0, B 1)
    (A 0, B 1, C 2)
    (A 0, B 1, C 2, D 3)
    (A 0, B 1, C 2, D 3, E 4)
    (A 0, B 1, C 2, D 3, E 4, F 5)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6)
    (A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7)
}

/// Implements [`FromTenantRow`] for a struct whose fields are named like
/// its columns: `tenant_row!(Test { id, prompt });`.
#[macro_export]
macro_rules! tenant_row {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $crate::pg::pipeline::FromTenantRow for $ty {
            fn from_row(row: &$crate::pg::pipeline::Row) -> Result<Self, sqlx::Error> {
                Ok($ty {
                    $($field: $crate::pg::pipeline::column(row, stringify!($field))?,)*
                })
            }
        }
    };
}
