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

use axum::routing::get;
use axum::{Json, Router};
use tenantry::api::error::ApiError;
use tenantry::api::extract::OrgScope;
use tenantry::api::TenantApi;
use tenantry::db::PoolConfig;
use tenantry::server::{self, Pools, ServerConfig};

#[derive(serde::Serialize, sqlx::FromRow)]
struct Note {
    id: i64,
    body: String,
}

/// `GET /v1/orgs/{slug}/notes`: the org's first 100 notes.
async fn list_notes(org: OrgScope) -> Result<Json<Vec<Note>>, ApiError> {
    let notes = org
        .read(|tx| {
            Box::pin(async move {
                Ok(tx
                    .query_as("SELECT id, body FROM notes ORDER BY id LIMIT 100")
                    .fetch_all()
                    .await?)
            })
        })
        .await?;
    Ok(Json(notes))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().init();
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let pool_config = PoolConfig::default();
    let admin = tenantry::db::connect(&url, &server::small_pool_config(&pool_config)).await?;
    let config = ServerConfig::default();
    let state = server::state(Pools::connect_lazy(admin, &url, &pool_config)?, &config).await?;

    // Your routes get the tenant state (router and authenticator, no pool);
    // tenantry's API is merged beside them.
    let tenant_api = TenantApi {
        router: state.tenancy.router().clone(),
        auth: state.tenancy.auth().clone(),
    };
    let app = Router::new()
        .route("/v1/orgs/{slug}/notes", get(list_notes))
        .with_state(tenant_api)
        .merge(tenantry::api::app(state));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
