//! Tenant data lifecycle, in one run on one database of `--tenants` orgs:
//! export and import of one tenant with `--rows` tests (seconds and MB/s;
//! binary rows, the default, and text)
//! beside `pg_dump --schema` and `pg_restore` of the same tenant, and a
//! clone of it.
//!
//!     cargo bench --bench lifecycle -- --tenants 1000 --rows 100000

mod common;

use std::process::Command;
use std::time::Instant;

use common::{arg, bench_pool};
use tenantry::base::ident::Slug;
use tenantry::tenants::archive::RowFormat;
use tenantry::tenants::template::Template;

/// The PostgreSQL client binary `name` next to the server binaries.
fn pg_binary(name: &str) -> std::path::PathBuf {
    tenantry::pg::embedded::find_bin_dir()
        .map(|dir| dir.join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| name.into())
}

fn run(program: &std::path::Path, args: &[&str]) -> f64 {
    let started = Instant::now();
    let out = Command::new(program).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

/// Exports `slug` to `archive` with rows in `format`, imports it as
/// `new_slug`: (export seconds, import seconds, archive MB).
async fn round_trip(
    pool: &sqlx::PgPool,
    template: &Template,
    slug: &Slug,
    format: RowFormat,
    archive: &std::path::Path,
    new_slug: &str,
) -> (f64, f64, f64) {
    let started = Instant::now();
    let mut file = tokio::fs::File::create(archive).await.unwrap();
    let exported = tenantry::tenants::archive::export_as(pool, slug, format, &mut file)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::flush(&mut file).await.unwrap();
    let export_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let input = tokio::fs::File::open(archive).await.unwrap();
    tenantry::tenants::archive::import(
        pool,
        template,
        &Slug::parse(new_slug).unwrap(),
        None,
        input,
    )
    .await
    .unwrap();
    (
        export_s,
        started.elapsed().as_secs_f64(),
        exported.bytes as f64 / 1e6,
    )
}

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 1000);
    let rows: i64 = arg("--rows", 100_000);
    let (pool, url) = bench_pool(4).await;
    tenantry::tenants::migrate_database(&pool).await.unwrap();
    let template = Template::embedded();
    let started = Instant::now();
    for i in 0..tenants {
        common::bench_tenant(&pool, &template, i).await;
    }
    println!(
        "{tenants} tenants made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let slug = Slug::parse("bench-0000").unwrap();
    let schema: String =
        sqlx::query_scalar("SELECT schema_name FROM tenantry.organizations WHERE slug = $1")
            .bind(slug.as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT 'prompt number ' || g || ' with some text to look like a real one', repeat('expected ', 8), \
                (SELECT id FROM {schema}.behaviors LIMIT 1), (SELECT id FROM {schema}.statuses LIMIT 1), \
                gen_random_uuid(), gen_random_uuid() \
         FROM generate_series(1, {rows}) g"
    ))
    .execute(&pool)
    .await
    .unwrap();
    // settled pages (hint bits set) for every reader alike: the first to
    // read fresh rows would otherwise pay for writing them
    sqlx::raw_sql(&format!("VACUUM ANALYZE {schema}.tests"))
        .execute(&pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    // tenantry: export to a file, import it under a new slug; binary rows
    // (the default), then text
    let (export_s, import_s, mb) = round_trip(
        &pool,
        &template,
        &slug,
        RowFormat::Binary,
        &dir.path().join("bench.tenantry"),
        "imported",
    )
    .await;
    let (text_export_s, text_import_s, text_mb) = round_trip(
        &pool,
        &template,
        &slug,
        RowFormat::Text,
        &dir.path().join("bench-text.tenantry"),
        "imported-text",
    )
    .await;

    // pg_dump of the same tenant (custom format), restored into a new schema
    let dump = dir.path().join("bench.dump");
    let dump_s = run(
        &pg_binary("pg_dump"),
        &[
            "--format=custom",
            "--schema",
            &schema,
            "--file",
            dump.to_str().unwrap(),
            &url,
        ],
    );
    let restored = "restored_copy";
    sqlx::raw_sql(&format!("ALTER SCHEMA {schema} RENAME TO {restored}_src"))
        .execute(&pool)
        .await
        .unwrap();
    let restore_s = run(
        &pg_binary("pg_restore"),
        &["--dbname", &url, "--no-owner", dump.to_str().unwrap()],
    );
    // put the source back under its name
    sqlx::raw_sql(&format!(
        "ALTER SCHEMA {schema} RENAME TO {restored}; ALTER SCHEMA {restored}_src RENAME TO {schema}"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let dump_mb = std::fs::metadata(&dump).unwrap().len() as f64 / 1e6;

    // clone
    let started = Instant::now();
    let cloned = tenantry::tenants::archive::clone_org(
        &pool,
        &template,
        &slug,
        &Slug::parse("cloned").unwrap(),
        None,
    )
    .await
    .unwrap();
    let clone_s = started.elapsed().as_secs_f64();

    println!("one tenant with {rows} tests among {tenants} tenants:");
    println!("| step | seconds | MB | MB/s |");
    println!("|---|---|---|---|");
    println!(
        "| tenantry export | {export_s:.2} | {mb:.1} | {:.1} |",
        mb / export_s
    );
    println!(
        "| tenantry import | {import_s:.2} | {mb:.1} | {:.1} |",
        mb / import_s
    );
    println!(
        "| tenantry export --format text | {text_export_s:.2} | {text_mb:.1} | {:.1} |",
        text_mb / text_export_s
    );
    println!(
        "| tenantry import (text) | {text_import_s:.2} | {text_mb:.1} | {:.1} |",
        text_mb / text_import_s
    );
    println!(
        "| pg_dump --schema (custom) | {dump_s:.2} | {dump_mb:.1} | {:.1} |",
        dump_mb / dump_s
    );
    println!(
        "| pg_restore | {restore_s:.2} | {dump_mb:.1} | {:.1} |",
        dump_mb / restore_s
    );
    println!(
        "| tenantry clone ({} rows) | {clone_s:.2} | | |",
        cloned.rows
    );
    println!(
        "export vs pg_dump: {:.1}x faster; import vs pg_restore: {:.1}x faster",
        dump_s / export_s,
        restore_s / import_s
    );
}
