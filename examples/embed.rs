//! Building on tenantry: an axum app of your own that serves a table of
//! your own from each org's schema, next to tenantry's API.
//!
//! The table comes from the tenant template: add a migration such as
//!
//! ```sql
//! -- my_template/V2__notes.sql (next to a copy of tenant_template/V1__initial.sql)
//! CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text NOT NULL);
//! ```
//!
//! and roll it out with `tenantry migrate --template-dir my_template`. Then
//!
//!     DATABASE_URL=postgres://... cargo run --example embed
//!     curl -H "Authorization: Bearer tny_..." localhost:3000/v1/orgs/acme/notes
//!
//! `OrgScope` does what tenantry's own routes do: it authenticates the
//! token, resolves `{slug}` through the cached router, checks that the
//! caller belongs to the org, and opens transactions that run as the org's
//! role with its schema as the search path. The handler never sees a pool,
//! so it cannot query outside the tenant.

use axum::extract::Query;
use axum::routing::get;
use axum::Json;
use tenantry::api::error::ApiError;
use tenantry::api::extract::OrgScope;
use tenantry::Tenantry;

#[derive(serde::Serialize)]
struct Note {
    id: i64,
    body: String,
}

// rows of tenant queries map to it by column name
tenantry::tenant_row!(Note { id, body });

#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    after: i64,
}

/// `GET /v1/orgs/{slug}/notes?after=N`: the org's next 100 notes.
async fn list_notes(org: OrgScope, Query(page): Query<Page>) -> Result<Json<Vec<Note>>, ApiError> {
    // `async move` takes what the closure uses (`page`) into it; reads are
    // retried on another connection if theirs dies.
    let notes = org
        .read(async move |tx| {
            Ok(tx
                .query_as("SELECT id, body FROM notes WHERE id > $1 ORDER BY id LIMIT 100")
                .bind(page.after)
                .fetch_all()
                .await?)
        })
        .await?;
    Ok(Json(notes))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    // Registry migrations, serving role, pools, cache listener: one call.
    let tenantry = Tenantry::connect(&url).await?;

    // Your routes beside tenantry's API, under its request handling
    // (request ids, request log, metrics, limits).
    let app = tenantry.app(axum::Router::new().route("/v1/orgs/{slug}/notes", get(list_notes)));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    tenantry.shutdown().await;
    Ok(())
}
