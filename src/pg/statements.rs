//! Sending SQL text that carries no bind parameters: one message or one
//! statement per message (Citus), the transaction-local search path, and
//! handing a schema's objects to a role. Everything here is protocol work;
//! which schema and which role is the caller's policy.

use std::future::Future;

use sqlx::PgConnection;

use crate::base::error::Error;
use crate::base::ident::{quote_ident, RoleName, SchemaName};

pub(crate) type SendFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'a>>;

/// Runs SQL text (one or several statements, no bind parameters) in one
/// round trip and returns the rows affected.
///
/// Both helpers here box their futures: with sqlx's `raw_sql` or inline in
/// `impl Future + Send` trait methods, the compiler's higher-ranked check of
/// sqlx's `Executor` impl for `&mut PgConnection` fails and callers' futures
/// stop being `Send`. Boxing proves `Send` here, where lifetimes are concrete.
pub fn simple_query<'a>(conn: &'a mut PgConnection, sql: &'a str) -> SendFuture<'a, u64> {
    // A plain &str has no bind arguments, so sqlx sends it with the simple
    // query protocol, which accepts several statements.
    Box::pin(async move { Ok(sqlx::Executor::execute(conn, sql).await?.rows_affected()) })
}

/// Sends SQL text: in one message, or one statement per message (for Citus,
/// see `engine`). Returns the rows affected.
pub fn send_statements<'a>(
    conn: &'a mut PgConnection,
    sql: &'a str,
    one_per_message: bool,
) -> SendFuture<'a, u64> {
    Box::pin(async move {
        if !one_per_message {
            return simple_query(conn, sql).await;
        }
        let mut affected = 0;
        for statement in crate::base::sql::statements(sql) {
            affected += simple_query(&mut *conn, statement).await?;
        }
        Ok(affected)
    })
}

/// Runs SQL text (one or several statements, no bind parameters) in one
/// round trip and returns the rows of all of them (boxed for `Send`, see
/// [`simple_query`]).
pub fn simple_rows<'a>(
    conn: &'a mut PgConnection,
    sql: &'a str,
) -> SendFuture<'a, Vec<sqlx::postgres::PgRow>> {
    Box::pin(async move { sqlx::Executor::fetch_all(conn, sql).await })
}

/// `SET LOCAL search_path` to exactly one schema. Only a parsed, quoted
/// [`SchemaName`] reaches the SQL text.
pub async fn set_local_search_path(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<(), sqlx::Error> {
    simple_query(
        conn,
        &format!("SET LOCAL search_path TO {}", schema.quoted()),
    )
    .await?;
    Ok(())
}

/// Makes `role` the owner of `schema` and of every object in it, inside the
/// caller's transaction (one statement per message when asked, for Citus).
pub async fn hand_over_schema(
    conn: &mut PgConnection,
    schema: &SchemaName,
    role: &RoleName,
    one_statement_per_message: bool,
) -> Result<(), Error> {
    // Only objects of the schema, named from the catalog and quoted.
    let objects: Vec<(String, String)> = sqlx::query_as(
        "SELECT CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' WHEN c.relkind IN ('v') THEN 'VIEW' \
                     WHEN c.relkind = 'm' THEN 'MATERIALIZED VIEW' WHEN c.relkind = 'f' THEN 'FOREIGN TABLE' \
                     ELSE 'TABLE' END, c.relname::text \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') \
           AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'a')) \
         UNION ALL \
         SELECT 'ROUTINE', format('%s(%s)', quote_ident(p.proname), pg_get_function_identity_arguments(p.oid)) \
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1 \
         UNION ALL \
         SELECT 'TYPE', t.typname::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         WHERE n.nspname = $1 AND t.typtype IN ('c', 'e', 'd', 'r') AND t.typrelid = 0 \
           AND t.typelem = 0 AND NOT EXISTS (SELECT 1 FROM pg_type a WHERE a.typarray = t.oid)",
    )
    .bind(schema.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let mut sql = format!(
        "ALTER SCHEMA {} OWNER TO {}",
        schema.quoted(),
        role.quoted()
    );
    for (kind, name) in objects {
        // Routines come with their argument list, already quoted by
        // PostgreSQL; everything else is one name we quote.
        let target = if kind == "ROUTINE" {
            format!("{}.{name}", schema.quoted())
        } else {
            format!("{}.{}", schema.quoted(), quote_ident(&name))
        };
        sql.push_str(&format!(
            "; ALTER {kind} {target} OWNER TO {}",
            role.quoted()
        ));
    }
    send_statements(conn, &sql, one_statement_per_message).await?;
    Ok(())
}
