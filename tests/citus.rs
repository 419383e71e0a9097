//! Citus-only behaviour, on a throwaway cluster (a coordinator and two
//! workers) started by the harness: where tenants and the registry live,
//! and moving tenants between workers. The rest of the suite runs on Citus
//! too (`TENANTRY_TEST_ENGINE=citus`, see `scripts/test`). Without the
//! Citus extension these tests say they were skipped, unless
//! `TENANTRY_REQUIRE_CITUS=1`, which makes that a failure.

mod common;

use std::collections::BTreeSet;

use common::TestDb;

/// Each tenant schema is a distributed schema on one worker, tenants land
/// on both workers, and the registry stays a local schema of the
/// coordinator.
#[tokio::test]
async fn tenants_spread_over_both_workers_and_the_registry_stays_local() {
    let Some(db) = TestDb::on_citus().await else {
        return;
    };
    let slugs = db.create_orgs("spread", 8).await;
    let placed: Vec<(String, i32)> = sqlx::query_as(
        "SELECT o.slug, min(s.nodeport) FROM tenantry.organizations o \
         JOIN citus_shards s ON s.citus_table_type = 'schema' \
           AND s.table_name::text LIKE o.schema_name || '.%' \
         GROUP BY o.slug ORDER BY o.slug",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        placed.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        slugs,
        "every org has shards"
    );
    let workers: BTreeSet<i32> = placed.iter().map(|p| p.1).collect();
    let cluster = common::citus_cluster();
    assert_eq!(
        workers,
        cluster.workers.iter().map(|w| i32::from(*w)).collect(),
        "tenants on both workers: {placed:?}"
    );
    // every table of a tenant is on the same worker as the others
    let split: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT split_part(table_name::text, '.', 1) \
         FROM citus_shards WHERE citus_table_type = 'schema' \
         GROUP BY 1 HAVING count(DISTINCT nodeport) > 1) x",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(split, 0);
    let distributed_schemas: Vec<String> =
        sqlx::query_scalar("SELECT schema_name::text FROM citus_schemas ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(distributed_schemas.len(), 8);
    assert!(!distributed_schemas.iter().any(|s| s == "tenantry"));
    let registry_tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM citus_tables WHERE table_name::text LIKE 'tenantry.%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        registry_tables, 0,
        "the registry is local to the coordinator"
    );
}
