//! Provisioning, the registry and the CLI against a real PostgreSQL.

mod common;

use common::TestDb;
use tenantry::base::error::Error;
use tenantry::base::ident::Slug;
use tenantry::registry::{self, OrgStatus};
use tenantry::tenants::archive::RowFormat;
use tenantry::tenants::jobs::JOBS_TABLE;
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::{Template, TemplateError, HISTORY_TABLE};

/// What the shared template's catalog gives every new org.
const DEFAULT_STATUSES: &[&str] = &["New", "Active", "Archived"];
const DEFAULT_BEHAVIORS: &[&str] = &["Reliability", "Compliance", "Robustness"];

fn new_org(slug: &str) -> NewOrg {
    NewOrg::parse(
        slug,
        &format!("Org {slug}"),
        Some(&format!("owner@{slug}.example")),
    )
    .unwrap()
}

fn slug(s: &str) -> Slug {
    Slug::parse(s).unwrap()
}

#[tokio::test]
async fn create_builds_schema_template_history_and_initial_data() {
    let db = TestDb::new().await;
    let template = Template::embedded();
    let created = provision::create_org(&db.pool, &template, &new_org("acme-corp"))
        .await
        .unwrap();
    let org = &created.organization;
    assert_eq!(org.slug.as_str(), "acme-corp");
    // named after the org's id, never after its (renamable) slug
    assert_eq!(org.schema_name.as_str(), format!("t_{}", org.id.simple()));
    let schema = org.schema_name.as_str();
    assert_eq!(org.status, OrgStatus::Active);
    assert_eq!(org.template_version, template.latest_version());
    assert!(template.latest_version() >= 1);

    assert_eq!(
        db.tables(schema).await,
        ["behaviors", HISTORY_TABLE, "statuses", JOBS_TABLE, "tests"]
    );
    // refinery's history lives in each schema it migrates: the tenant's,
    // the shared schema and the registry
    let history_schemas: Vec<String> = sqlx::query_scalar(
        "SELECT schemaname::text FROM pg_tables WHERE tablename = $1 ORDER BY 1",
    )
    .bind(HISTORY_TABLE)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(history_schemas, ["shared", schema, "tenantry"]);
    assert!(db.tables("public").await.is_empty());

    let max_history = db
        .count(&format!(
            "SELECT max(version)::int8 FROM {schema}.refinery_schema_history"
        ))
        .await;
    assert_eq!(max_history, org.template_version as i64);

    let owner = created.owner.as_ref().expect("owner user");
    assert_eq!(owner.email, "owner@acme-corp.example");
    assert_eq!(owner.organization_id, Some(org.id));
    let statuses: Vec<(String, uuid::Uuid, uuid::Uuid)> = sqlx::query_as(&format!(
        "SELECT name, created_by, updated_by FROM {schema}.statuses ORDER BY created_at, name"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut names: Vec<&str> = statuses.iter().map(|s| s.0.as_str()).collect();
    names.sort();
    let mut want = DEFAULT_STATUSES.to_vec();
    want.sort();
    assert_eq!(names, want);
    assert!(statuses.iter().all(|s| s.1 == owner.id && s.2 == owner.id));
    let behaviors: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT name FROM {schema}.behaviors WHERE created_by = $1 ORDER BY name"
    ))
    .bind(owner.id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut want = DEFAULT_BEHAVIORS.to_vec();
    want.sort();
    assert_eq!(behaviors, want);
}

#[tokio::test]
async fn org_without_owner_records_system_user() {
    let db = TestDb::new().await;
    let new = NewOrg::parse("solo", "Solo", None).unwrap();
    let created = provision::create_org(&db.pool, &Template::embedded(), &new)
        .await
        .unwrap();
    assert!(created.owner.is_none());
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.statuses WHERE created_by = '00000000-0000-0000-0000-000000000000'",
            created.organization.schema_name
        ))
        .await,
        DEFAULT_STATUSES.len() as i64
    );
    assert_eq!(db.count("SELECT count(*) FROM tenantry.users").await, 0);
}

async fn assert_nothing_left(db: &TestDb, new: &NewOrg) {
    let schema = tenantry::base::ident::SchemaName::for_org(&new.id);
    assert!(
        !db.schema_exists(schema.as_str()).await,
        "schema {schema} left behind"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.organizations")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM tenantry.users").await, 0);
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.api_tokens").await,
        0
    );
}

#[tokio::test]
async fn failure_after_template_leaves_nothing_behind() {
    let db = TestDb::new().await;
    fn fail() -> Result<(), Error> {
        Err(Error::Conflict("injected failure".into()))
    }
    let new = new_org("doomed");
    let err = provision::create_org_with_hook(&db.pool, &Template::embedded(), &new, Some(fail))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_nothing_left(&db, &new).await;
}

#[tokio::test]
async fn failing_template_step_leaves_nothing_behind_and_names_the_step() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("V1__ok.sql"), "CREATE TABLE a (id int);").unwrap();
    std::fs::write(
        dir.path().join("V2__broken.sql"),
        "CREATE TABLE b (id int); SELECT 1/0;",
    )
    .unwrap();
    let template = Template::from_dir(dir.path()).unwrap();
    let new = new_org("broken-template");
    let err = provision::create_org(&db.pool, &template, &new)
        .await
        .unwrap_err();
    match &err {
        Error::Template(TemplateError::Migration { message, .. }) => {
            assert!(message.contains("division by zero"), "{message}")
        }
        other => panic!("expected a template error, got {other:?}"),
    }
    assert_nothing_left(&db, &new).await;
    // the slug is free again afterwards
    provision::create_org(&db.pool, &Template::embedded(), &new_org("broken-template"))
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_creates_of_one_slug_exactly_one_wins() {
    let db = TestDb::new().await;
    let template = Template::embedded();
    let attempts = 6;
    let handles: Vec<_> = (0..attempts)
        .map(|_| {
            let pool = db.pool.clone();
            let template = template.clone();
            tokio::spawn(async move {
                provision::create_org(&pool, &template, &new_org("contended")).await
            })
        })
        .collect();
    let mut ok = 0;
    let mut conflicts = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::Conflict(msg)) => {
                assert!(msg.contains("already exists"), "{msg}");
                conflicts += 1
            }
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!((ok, conflicts), (1, attempts - 1));
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.organizations")
            .await,
        1
    );
    assert_eq!(db.count("SELECT count(*) FROM tenantry.users").await, 1);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.statuses",
            db.schema_of("contended").await
        ))
        .await,
        DEFAULT_STATUSES.len() as i64
    );
}

#[tokio::test]
async fn leftover_schema_is_reported_not_adopted() {
    let db = TestDb::new().await;
    // A schema already carrying the name the new org's id maps to (only
    // possible by hand or from a foreign tool: ids are never reused).
    let new = new_org("squatter");
    let squatted = tenantry::base::ident::SchemaName::for_org(&new.id);
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {squatted}; CREATE TABLE {squatted}.keep (v int); INSERT INTO {squatted}.keep VALUES (42);"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let err = provision::create_org(&db.pool, &Template::embedded(), &new)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict(m) if m.contains("doctor")),
        "{err:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.organizations")
            .await,
        0
    );
    assert_eq!(
        db.count(&format!("SELECT v::int8 FROM {squatted}.keep"))
            .await,
        42
    );
}

#[tokio::test]
async fn delete_drops_schema_registry_row_users_and_tokens() {
    let db = TestDb::new().await;
    let template = Template::embedded();
    let gone = provision::create_org(&db.pool, &template, &new_org("gone"))
        .await
        .unwrap()
        .organization
        .schema_name;
    let stays = provision::create_org(&db.pool, &template, &new_org("stays"))
        .await
        .unwrap()
        .organization
        .schema_name;
    provision::issue_org_token(&db.pool, &slug("gone"), "x@gone.example", None, None)
        .await
        .unwrap();
    let deleted = provision::delete_org(&db.pool, &slug("gone"))
        .await
        .unwrap();
    assert_eq!(deleted.slug.as_str(), "gone");
    assert!(!db.schema_exists(gone.as_str()).await);
    assert!(db.schema_exists(stays.as_str()).await);
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.organizations")
            .await,
        1
    );
    assert_eq!(db.count("SELECT count(*) FROM tenantry.users").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.api_tokens").await,
        0
    );
    let again = provision::delete_org(&db.pool, &slug("gone"))
        .await
        .unwrap_err();
    assert!(matches!(again, Error::OrgNotFound(_)));
}

#[tokio::test]
async fn suspend_resume_and_rename() {
    let db = TestDb::new().await;
    let shop = provision::create_org(&db.pool, &Template::embedded(), &new_org("shop"))
        .await
        .unwrap()
        .organization;
    let s = provision::suspend_org(&db.pool, &slug("shop"))
        .await
        .unwrap();
    assert_eq!(s.status, OrgStatus::Suspended);
    let twice = provision::suspend_org(&db.pool, &slug("shop"))
        .await
        .unwrap_err();
    assert!(
        matches!(&twice, Error::InvalidState { status, .. } if status == "suspended"),
        "{twice:?}"
    );
    let r = provision::resume_org(&db.pool, &slug("shop"))
        .await
        .unwrap();
    assert_eq!(r.status, OrgStatus::Active);
    assert!(matches!(
        provision::resume_org(&db.pool, &slug("nope"))
            .await
            .unwrap_err(),
        Error::OrgNotFound(_)
    ));

    let renamed = provision::rename_org(&db.pool, &slug("shop"), &slug("boutique"))
        .await
        .unwrap();
    // the schema stays with the org: same id, same schema, same data
    assert_eq!(renamed.id, shop.id);
    assert_eq!(renamed.schema_name, shop.schema_name);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.statuses",
            shop.schema_name
        ))
        .await,
        3
    );
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(registry::find_org(&mut conn, &slug("shop"))
        .await
        .unwrap()
        .is_none());
    // the old slug is free again, for a new org with a schema of its own;
    // renaming onto a taken slug is a conflict
    let reused = provision::create_org(&db.pool, &Template::embedded(), &new_org("shop"))
        .await
        .unwrap()
        .organization;
    assert_ne!(reused.schema_name, shop.schema_name);
    let clash = provision::rename_org(&db.pool, &slug("boutique"), &slug("shop"))
        .await
        .unwrap_err();
    assert!(matches!(clash, Error::Conflict(_)), "{clash:?}");
    assert!(db.schema_exists(shop.schema_name.as_str()).await);
}

#[tokio::test]
async fn tokens_are_stored_hashed_and_revocable() {
    let db = TestDb::new().await;
    provision::create_org(&db.pool, &Template::embedded(), &new_org("tok"))
        .await
        .unwrap();
    let (user, issued) =
        provision::issue_org_token(&db.pool, &slug("tok"), "Dev@Tok.Example", Some("ci"), None)
            .await
            .unwrap();
    assert_eq!(user.email, "dev@tok.example");
    // reusing the address reuses the user
    let (same_user, second) =
        provision::issue_org_token(&db.pool, &slug("tok"), "dev@tok.example", None, None)
            .await
            .unwrap();
    assert_eq!(same_user.id, user.id);
    assert_ne!(second.token, issued.token);

    // nothing stored contains the secret
    let leaked = db
        .count(&format!(
            "SELECT count(*) FROM tenantry.api_tokens t WHERE t::text LIKE '%{}%' OR encode(secret_hash, 'escape') LIKE '%{}%'",
            &issued.token[13..], &issued.token[13..]
        ))
        .await;
    assert_eq!(leaked, 0);

    let p = registry::authenticate(&db.pool, &issued.token)
        .await
        .unwrap()
        .expect("valid token");
    assert_eq!(p.user_id, user.id);
    assert_eq!(p.organization_id, Some(user.organization_id.unwrap()));
    assert!(!p.is_superuser);
    // a token differing in one character, or a truncated one, is unknown
    let mut tampered = issued.token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    assert!(registry::authenticate(&db.pool, &tampered)
        .await
        .unwrap()
        .is_none());
    assert!(registry::authenticate(&db.pool, &issued.token[..40])
        .await
        .unwrap()
        .is_none());

    assert!(provision::revoke_token(&db.pool, issued.info.id)
        .await
        .unwrap()
        .is_some());
    assert!(provision::revoke_token(&db.pool, issued.info.id)
        .await
        .unwrap()
        .is_none());
    assert!(registry::authenticate(&db.pool, &issued.token)
        .await
        .unwrap()
        .is_none());
    assert!(registry::authenticate(&db.pool, &second.token)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn invalid_input_is_rejected_with_reasons() {
    for (raw, why) in [
        ("A", "at least 2"),
        ("Acme", "start with a lowercase letter"),
        ("ac\"me", "found '\"'"),
        ("acme; drop schema public", "found ';'"),
        ("acme-", "end with '-'"),
        ("admin", "reserved"),
        ("pg-toast", "reserved"),
    ] {
        let err = NewOrg::parse(raw, "Name", None).unwrap_err();
        assert!(err.to_string().contains(why), "{raw:?}: {err}");
    }
    assert!(NewOrg::parse("fine", "  ", None)
        .unwrap_err()
        .to_string()
        .contains("name"));
    assert!(NewOrg::parse("fine", "ok", Some("not-an-email"))
        .unwrap_err()
        .to_string()
        .contains("email"));
    assert!(NewOrg::parse("fine", "ok", Some("a b@c.d")).is_err());
}

#[tokio::test]
async fn cli_manages_orgs_and_tokens() {
    let db = TestDb::new().await;
    let (ok, out, err) = db.cli(&[
        "orgs",
        "create",
        "cli-org",
        "--name",
        "CLI Org",
        "--owner-email",
        "o@cli.example",
    ]);
    assert!(ok, "{err}");
    let schema = db.schema_of("cli-org").await;
    assert!(
        out.contains("cli-org") && out.contains(&schema) && out.contains("active"),
        "{out}"
    );

    let (ok, out, _) = db.cli(&["orgs", "list", "--json"]);
    assert!(ok);
    let orgs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(orgs[0]["slug"], "cli-org");
    assert_eq!(orgs[0]["schema_name"], schema.as_str());
    assert_eq!(orgs[0]["template_version"], 1);

    let (ok, _, err) = db.cli(&["orgs", "create", "cli-org", "--name", "Again"]);
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");

    let (ok, _, err) = db.cli(&["orgs", "create", "Bad\"Slug", "--name", "x"]);
    assert!(!ok);
    assert!(err.contains("invalid slug"), "{err}");

    let (ok, out, err) = db.cli(&[
        "tokens",
        "create",
        "cli-org",
        "--email",
        "bot@cli.example",
        "--json",
    ]);
    assert!(ok, "{err}");
    let issued: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = issued["token"]["token"].as_str().unwrap();
    assert!(token.starts_with("tny_"));
    assert!(registry::authenticate(&db.pool, token)
        .await
        .unwrap()
        .is_some());

    let (ok, _, err) = db.cli(&["orgs", "suspend", "cli-org"]);
    assert!(ok, "{err}");
    let (ok, _, err) = db.cli(&["orgs", "suspend", "cli-org"]);
    assert!(!ok && err.contains("suspended"), "{err}");

    let (ok, _, err) = db.cli(&["orgs", "delete", "cli-org"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    assert!(db.schema_exists(&schema).await);
    let (ok, _, err) = db.cli(&["orgs", "delete", "cli-org", "--yes"]);
    assert!(ok, "{err}");
    assert!(!db.schema_exists(&schema).await);
    let (ok, _, err) = db.cli(&["orgs", "delete", "cli-org", "--yes"]);
    assert!(!ok && err.contains("not found"), "{err}");
}

#[tokio::test]
async fn quoted_identifiers_survive_hostile_names_in_postgres() {
    let db = TestDb::new().await;
    let hostile = [
        "x\"; DROP SCHEMA tenantry CASCADE; --",
        "\"",
        "a\"\"b",
        "t_ok\" , public",
        "semi;colon",
        "new\nline",
        "ünïcødé",
        "$1",
    ];
    for name in hostile {
        let quoted = tenantry::base::ident::quote_ident(name);
        sqlx::raw_sql(&format!("CREATE SCHEMA {quoted}"))
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert!(
            db.schema_exists(name).await,
            "schema {name:?} not created verbatim"
        );
        // and the quoted name works as a search_path entry on its own
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::raw_sql(&format!("SET LOCAL search_path TO {quoted}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        let path: Vec<String> = sqlx::query_scalar("SELECT current_schemas(false)::text[]")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(path, [name], "search_path must be exactly the one schema");
        tx.rollback().await.unwrap();
    }
    assert!(db.schema_exists("tenantry").await);
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.organizations")
            .await,
        0
    );
}

#[tokio::test]
async fn concurrent_tokens_for_a_new_address_share_one_user() {
    let db = TestDb::new().await;
    provision::create_org(&db.pool, &Template::embedded(), &new_org("race"))
        .await
        .unwrap();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                provision::issue_org_token(&pool, &slug("race"), "new@race.example", None, None)
                    .await
            })
        })
        .collect();
    let mut users = vec![];
    for h in handles {
        users.push(h.await.unwrap().unwrap().0.id);
    }
    users.dedup();
    assert_eq!(users.len(), 1);
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.users WHERE email = 'new@race.example'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.api_tokens").await,
        6
    );
}

/// Every row of every table of `schema`, as JSON, by id.
async fn rows_of(
    db: &TestDb,
    schema: &str,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut all = std::collections::BTreeMap::new();
    for table in ["statuses", "behaviors", "tests"] {
        let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(&format!(
            "SELECT '{table}:' || id, to_jsonb(t) FROM {schema}.{table} t"
        ))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        all.extend(rows);
    }
    all
}

/// Imports `archive` as a new org `slug` with the built-in template.
async fn import_as(
    db: &TestDb,
    slug: &str,
    archive: &[u8],
) -> Result<tenantry::tenants::archive::Imported, Error> {
    tenantry::tenants::archive::import(
        &db.pool,
        &Template::embedded(),
        &Slug::parse(slug).unwrap(),
        None,
        archive,
    )
    .await
}

/// The constraints and indexes of a schema's tables, by table and name,
/// with their definitions (the schema's name left out). Not the NOT NULL
/// constraints PostgreSQL 18 catalogues too: on every version they are
/// part of the columns.
async fn structure_of(db: &TestDb, schema: &str) -> Vec<(String, String, String)> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT t.relname::text, c.conname::text, pg_get_constraintdef(c.oid) \
         FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
         WHERE t.relnamespace = $1::regnamespace AND c.contype <> 'n' \
         UNION ALL \
         SELECT t.relname::text, i.relname::text, pg_get_indexdef(i.oid) \
         FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid \
         WHERE t.relnamespace = $1::regnamespace ORDER BY 1, 2, 3",
    )
    .bind(schema)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(t, n, d)| (t, n, d.replace(schema, "<schema>")))
        .collect()
}

/// Export and import under a new slug give back every row of every table
/// (ids, timestamps, texts with tabs, newlines, backslashes, unicode),
/// while a writer keeps writing to the source: the archive is one
/// snapshot, its row counts match the checksummed rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_then_import_round_trips_every_row_while_the_source_keeps_writing() {
    let db = TestDb::new().await;
    db.create_orgs("src", 1).await;
    let schema = db.schema_of("src-00").await;
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT 'row ' || g || E'\\ttab\\nnew line \\\\ back\\\\slash ünïcødé 🦀 ''quote'' \"dq\"', repeat('x', g % 300), \
                (SELECT id FROM {schema}.behaviors LIMIT 1), (SELECT id FROM {schema}.statuses LIMIT 1), \
                gen_random_uuid(), gen_random_uuid() \
         FROM generate_series(1, 3000) g; \
         INSERT INTO {schema}.statuses (name, description, created_by, updated_by) \
         VALUES (E'odd\\\\N name', NULL, gen_random_uuid(), gen_random_uuid())"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (pool, schema, stop) = (db.pool.clone(), schema.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                sqlx::raw_sql(&format!(
                    "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
                     SELECT 'during export {n}', '', (SELECT id FROM {schema}.behaviors LIMIT 1), \
                            (SELECT id FROM {schema}.statuses LIMIT 1), gen_random_uuid(), gen_random_uuid()"
                ))
                .execute(&pool)
                .await
                .unwrap();
            }
            n
        })
    };
    // let the writer get going, then export while it writes
    while db
        .count(&format!(
            "SELECT count(*) FROM {schema}.tests WHERE prompt LIKE 'during export%'"
        ))
        .await
        < 20
    {
        tokio::task::yield_now().await;
    }
    let mut archive = Vec::new();
    let exported =
        tenantry::tenants::archive::export(&db.pool, &Slug::parse("src-00").unwrap(), &mut archive)
            .await
            .unwrap();
    assert!(
        archive.starts_with(b"tenantry-archive 2\n"),
        "binary rows by default"
    );
    let during = db
        .count(&format!(
            "SELECT count(*) FROM {schema}.tests WHERE prompt LIKE 'during export%'"
        ))
        .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    // At least 20 rows were written before the export began, and the writer
    // ran on through it; whether one of its commits landed inside the
    // export's snapshot window is timing (the export can be faster than one
    // insert), so the check is on the snapshot below, not on a count.
    assert!(written >= 20 && during >= 20, "{written} {during}");
    assert_eq!(exported.bytes, archive.len() as u64);

    let imported = import_as(&db, "copy", &archive).await.unwrap();
    assert_eq!(imported.created.organization.name, "Test");
    let copy_schema = db.schema_of("copy").await;
    let copied = rows_of(&db, &copy_schema).await;
    let source = rows_of(&db, &schema).await;
    // the header's counts are the archived rows, all of them imported
    let header_rows: u64 = exported.header.tables.iter().map(|t| t.rows).sum();
    assert_eq!(copied.len() as u64, header_rows);
    assert_eq!(imported.rows, header_rows);
    // every imported row is the source's row with that id, unchanged
    for (id, row) in &copied {
        assert_eq!(source.get(id), Some(row), "{id}");
    }
    // a consistent snapshot: the source's rows at one instant, so the rows
    // written during the export are a prefix of the writer's sequence
    let copied_during: Vec<i64> = copied
        .values()
        .filter_map(|r| {
            r["prompt"]
                .as_str()?
                .strip_prefix("during export ")?
                .parse()
                .ok()
        })
        .collect();
    let max = copied_during.iter().max().copied().unwrap_or(0);
    assert_eq!(
        copied_during.len() as i64,
        max,
        "a gap in the writer's rows"
    );
    assert!(
        source.len() > copied.len(),
        "the writer wrote after the snapshot"
    );
    // it serves like any org
    let tests_of_copy = db
        .count(&format!("SELECT count(*) FROM {copy_schema}.tests"))
        .await;
    assert_eq!(tests_of_copy, 3000 + max);
    // the keys, indexes and foreign keys the import set aside for the load
    // are back, as the template made them
    let source_schema = db.schema_of("src-00").await;
    assert_eq!(
        structure_of(&db, &copy_schema).await,
        structure_of(&db, &source_schema).await
    );
    // the template's 18, and the job table's key, 5 checks and 4 indexes
    assert_eq!(structure_of(&db, &copy_schema).await.len(), 18 + 10);

    // the CLI: to a file and back, under another slug and name, in the
    // text format (archive format 1) this time; the writer has stopped, so
    // the copy is the source as it is now
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("src.tenantry");
    let file = file.to_str().unwrap();
    let (ok, _, err) = db.cli(&[
        "orgs", "export", "src-00", "--output", file, "--format", "text",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("exported src-00"), "{err}");
    assert!(!std::path::Path::new(&format!("{file}.partial")).exists());
    assert!(std::fs::read(file)
        .unwrap()
        .starts_with(b"tenantry-archive 1\n"));
    let (ok, out, err) = db.cli(&[
        "orgs", "import", "copy-two", "--input", file, "--name", "Copy Two", "--json",
    ]);
    assert!(ok, "{err}");
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["organization"]["name"], "Copy Two");
    assert_eq!(
        rows_of(&db, &db.schema_of("copy-two").await).await,
        rows_of(&db, &schema).await
    );
    let (ok, _, err) = db.cli(&["orgs", "export", "src-00", "--format", "csv"]);
    assert!(!ok);
    assert!(err.contains("csv"), "{err}");
}

/// Truncated, corrupted, tampered, unknown-format and wrong-version
/// archives are refused with a clear error, and leave nothing behind: no
/// org, no schema. (The org's role is created in the same transaction;
/// roles are shared by the whole server, where other tests create theirs
/// concurrently, so they are not counted here.)
#[tokio::test]
async fn bad_archives_are_refused_and_leave_nothing_behind() {
    let db = TestDb::new().await;
    db.create_orgs("good", 1).await;
    let good = db.schema_of("good-00").await;
    sqlx::raw_sql(&format!(
        "INSERT INTO {good}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT 'p' || g, 'ok', (SELECT id FROM {good}.behaviors LIMIT 1), (SELECT id FROM {good}.statuses LIMIT 1), \
                gen_random_uuid(), gen_random_uuid() FROM generate_series(1, 3) g"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let good_slug = Slug::parse("good-00").unwrap();
    let mut archive = Vec::new();
    tenantry::tenants::archive::export_as(&db.pool, &good_slug, RowFormat::Text, &mut archive)
        .await
        .unwrap();
    let mut binary = Vec::new();
    tenantry::tenants::archive::export_as(&db.pool, &good_slug, RowFormat::Binary, &mut binary)
        .await
        .unwrap();
    let text = String::from_utf8(archive.clone()).unwrap();
    let header_end =
        text.find('\n').unwrap() + 1 + text[text.find('\n').unwrap() + 1..].find('\n').unwrap() + 1;
    let data = header_end..archive.len() - 4;
    let mut corrupted = archive.clone();
    corrupted[data.start + 3] ^= 0x55;
    // same length, different content: a name changed, checksum left alone
    let tampered = {
        let body = &text[header_end..];
        let first_tab = body.find('\t').unwrap();
        let mut t = text.clone();
        let at = header_end + first_tab + 1;
        let replacement = if &t[at..at + 1] == "Z" { "Y" } else { "Z" };
        t.replace_range(at..at + 1, replacement);
        t.into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated in the rows",
            archive[..data.start + (data.end - data.start) / 2].to_vec(),
            "truncated",
        ),
        (
            "without its end",
            archive[..archive.len() - 4].to_vec(),
            "does not end where its header says",
        ),
        (
            "with extra data",
            [archive.clone(), b"more".to_vec()].concat(),
            "does not end where its header says",
        ),
        (
            "truncated in the header",
            archive[..header_end - 10].to_vec(),
            "header is truncated",
        ),
        ("corrupted", corrupted, "table"),
        ("tampered", tampered, "checksum"),
        (
            "another format",
            text.replacen("tenantry-archive 1", "tenantry-archive 3", 1)
                .into_bytes(),
            "format \"3\" is not supported",
        ),
        (
            "a later template",
            text.replacen("\"template_version\":1", "\"template_version\":99", 1)
                .into_bytes(),
            "template version 99",
        ),
        (
            "a later shared schema",
            text.replacen("\"shared_version\":1", "\"shared_version\":7", 1)
                .into_bytes(),
            "shared schema version 7",
        ),
        (
            "not an archive",
            b"PGDMP\x01\x0e".to_vec(),
            "not a tenantry archive",
        ),
        ("empty", vec![], "not a tenantry archive"),
        (
            "binary, truncated in the rows",
            binary[..binary.len() - 40].to_vec(),
            "truncated",
        ),
        (
            "binary, a byte changed",
            {
                let mut b = binary.clone();
                let at = b.len() - 30;
                b[at] ^= 0x01;
                b
            },
            "checksum",
        ),
        (
            "binary rows under a text header",
            [
                b"tenantry-archive 1\n".to_vec(),
                binary[b"tenantry-archive 2\n".len()..].to_vec(),
            ]
            .concat(),
            "says format 1",
        ),
        // forged with matching counts and checksums: the keys catch them
        (
            "forged: tests whose behaviors are gone",
            forge(&archive, "behaviors", |_| String::new()),
            "foreign key",
        ),
        (
            "forged: a status twice",
            forge(&archive, "statuses", |rows| {
                let first = rows.lines().next().unwrap().to_owned();
                format!("{rows}{first}\n")
            }),
            "key",
        ),
    ];
    let schemas = db
        .count("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%'")
        .await;
    for (what, bytes, needle) in cases {
        let err = import_as(&db, "restored", &bytes).await.expect_err(what);
        let message = err.to_string();
        assert!(
            matches!(
                err,
                Error::Validation {
                    field: "archive",
                    ..
                }
            ),
            "{what}: {message}"
        );
        assert!(message.contains(needle), "{what}: {message}");
        let mut conn = db.pool.acquire().await.unwrap();
        assert!(
            registry::find_org(&mut conn, &Slug::parse("restored").unwrap())
                .await
                .unwrap()
                .is_none(),
            "{what}: an org was left behind"
        );
        assert_eq!(
            db.count("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%'")
                .await,
            schemas,
            "{what}"
        );
    }
    // and the good archives import, both formats
    for (slug, bytes) in [("restored", &archive), ("restored-binary", &binary)] {
        import_as(&db, slug, bytes).await.unwrap();
        assert_eq!(
            rows_of(&db, &db.schema_of(slug).await).await,
            rows_of(&db, &good).await
        );
    }
}

/// `archive` with the rows of `table` replaced by `edit(rows)`, its row
/// count, size and checksum made to match: a forgery only the database's
/// keys can catch.
fn forge(archive: &[u8], table: &str, edit: impl Fn(&str) -> String) -> Vec<u8> {
    use sha2::Digest;
    let text = std::str::from_utf8(archive).unwrap();
    let mut lines = text.splitn(3, '\n');
    let (magic, header, mut rest) = (
        lines.next().unwrap(),
        lines.next().unwrap(),
        lines.next().unwrap(),
    );
    let mut header: tenantry::tenants::archive::Header = serde_json::from_str(header).unwrap();
    let mut body = String::new();
    for t in &mut header.tables {
        let (rows, tail) = rest.split_at(t.bytes as usize);
        rest = tail;
        let rows = if t.name == table {
            edit(rows)
        } else {
            rows.to_owned()
        };
        t.rows = rows.matches('\n').count() as u64;
        t.bytes = rows.len() as u64;
        t.sha256 = sha2::Sha256::digest(rows.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        body.push_str(&rows);
    }
    assert_eq!(rest, "end\n");
    format!(
        "{magic}\n{}\n{body}end\n",
        serde_json::to_string(&header).unwrap()
    )
    .into_bytes()
}

/// A writer that takes `left` bytes, then fails (a client gone away).
struct GoneAway {
    left: usize,
}

impl tokio::io::AsyncWrite for GoneAway {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        std::task::Poll::Ready(Ok(n))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// An export abandoned in the middle of its rows fails cleanly and does
/// not hand a connection stuck in the middle of a COPY back to the pool.
#[tokio::test]
async fn an_abandoned_export_leaves_the_pool_usable() {
    let db = TestDb::new().await;
    db.create_orgs("gone", 1).await;
    let schema = db.schema_of("gone-00").await;
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT repeat('p', 500), 'ok', (SELECT id FROM {schema}.behaviors LIMIT 1), \
                (SELECT id FROM {schema}.statuses LIMIT 1), gen_random_uuid(), gen_random_uuid() \
         FROM generate_series(1, 2000) g"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // one connection: the next use gets the very connection the export had
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let err = tenantry::tenants::archive::export(
        &pool,
        &Slug::parse("gone-00").unwrap(),
        &mut GoneAway { left: 5000 },
    )
    .await
    .expect_err("the writer went away");
    assert!(
        err.to_string().contains("cannot write the archive"),
        "{err}"
    );
    for _ in 0..3 {
        let mut tx = pool.begin().await.expect("a clean connection");
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.tests"))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 2000);
        tx.commit().await.unwrap();
    }
}

// ---------------------------------------------------------------- warm pool

/// The warm pool's org ids, oldest first.
async fn warm_ids(db: &TestDb) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("SELECT org_id FROM tenantry.warm_schemas ORDER BY created_at, org_id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Rows of `statuses` in `schema`.
async fn statuses_in(db: &TestDb, schema: &tenantry::base::ident::SchemaName) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM {}.statuses",
        schema.quoted()
    ))
    .await
}

/// Every `t_*` schema in the database.
async fn tenant_schemas(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%'")
        .await
}

#[tokio::test]
async fn a_signup_takes_a_warm_schema_and_builds_nothing() {
    let db = TestDb::new().await;
    let template = Template::embedded();
    assert_eq!(
        tenantry::tenants::warm::fill(&db.pool, &template, 2)
            .await
            .unwrap(),
        2
    );
    // filling again to the same size builds nothing
    assert_eq!(
        tenantry::tenants::warm::fill(&db.pool, &template, 2)
            .await
            .unwrap(),
        0
    );
    let warm = warm_ids(&db).await;
    assert_eq!(warm.len(), 2);
    assert_eq!(tenant_schemas(&db).await, 2);

    let created = provision::create_org(&db.pool, &template, &new_org("warm-start"))
        .await
        .unwrap();
    assert!(created.from_warm_pool);
    let org = &created.organization;
    // the oldest warm schema, with its id: nothing was built or renamed
    assert_eq!(org.id, warm[0]);
    assert_eq!(org.schema_name.as_str(), format!("t_{}", warm[0].simple()));
    assert_eq!(warm_ids(&db).await, [warm[1]]);
    assert_eq!(tenant_schemas(&db).await, 2);
    assert_eq!(org.template_version, template.latest_version());

    let schema = org.schema_name.as_str();
    assert_eq!(
        db.tables(schema).await,
        ["behaviors", HISTORY_TABLE, "statuses", JOBS_TABLE, "tests"]
    );
    let owner: String =
        sqlx::query_scalar("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1")
            .bind(schema)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(owner, format!("t_{}", org.id.simple()));
    let author = created.owner.as_ref().unwrap().id;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {schema}.statuses WHERE created_by = '{author}'"
        ))
        .await,
        DEFAULT_STATUSES.len() as i64
    );
    // the initial data was written as the tenant's role, like a cold create
    let table_owner: String = sqlx::query_scalar(&format!(
        "SELECT tableowner::text FROM pg_tables WHERE schemaname = '{schema}' AND tablename = 'statuses'"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(table_owner, owner);
    // a warm schema is no orphan
    let report = tenantry::tenants::fleet::doctor(&db.pool, false)
        .await
        .unwrap();
    assert!(report.findings.is_empty(), "{report:?}");

    // a signup without an owner: the initial data goes to the system user
    let ownerless = provision::create_org(
        &db.pool,
        &template,
        &NewOrg::parse("warm-two", "Warm Two", None).unwrap(),
    )
    .await
    .unwrap();
    assert!(ownerless.from_warm_pool && ownerless.owner.is_none());
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.statuses WHERE created_by = '{}' AND updated_by = created_by",
            ownerless.organization.schema_name,
            provision::SYSTEM_USER_ID
        ))
        .await,
        DEFAULT_STATUSES.len() as i64
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.behaviors WHERE created_by <> '{}'",
            ownerless.organization.schema_name,
            provision::SYSTEM_USER_ID
        ))
        .await,
        0
    );
    // with the pool empty, signups build their schema as before
    let cold = provision::create_org(&db.pool, &template, &new_org("cold-one"))
        .await
        .unwrap();
    assert!(!warm.contains(&cold.organization.id));
    assert!(!cold.from_warm_pool);
    assert!(warm_ids(&db).await.is_empty());
    assert_eq!(tenant_schemas(&db).await, 3);
}

/// Signups at once, more than the pool holds: each warm schema goes to
/// exactly one org, the others build their own, and every org's initial
/// data is there once (two orgs sharing a schema would show it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_signups_never_share_a_warm_schema() {
    let db = TestDb::new().await;
    let template = std::sync::Arc::new(Template::embedded());
    tenantry::tenants::warm::fill(&db.pool, &template, 4)
        .await
        .unwrap();
    let warm = warm_ids(&db).await;
    let mut tasks = vec![];
    for i in 0..10 {
        let (pool, template) = (db.pool.clone(), template.clone());
        tasks.push(tokio::spawn(async move {
            provision::create_org(&pool, &template, &new_org(&format!("rush-{i}")))
                .await
                .unwrap()
                .organization
        }));
    }
    let mut orgs = vec![];
    for t in tasks {
        orgs.push(t.await.unwrap());
    }
    let ids: std::collections::HashSet<_> = orgs.iter().map(|o| o.id).collect();
    let schemas: std::collections::HashSet<_> =
        orgs.iter().map(|o| o.schema_name.clone()).collect();
    assert_eq!((ids.len(), schemas.len()), (10, 10));
    assert_eq!(ids.iter().filter(|id| warm.contains(id)).count(), 4);
    assert!(warm_ids(&db).await.is_empty());
    assert_eq!(tenant_schemas(&db).await, 10);
    for org in &orgs {
        assert_eq!(
            statuses_in(&db, &org.schema_name).await,
            DEFAULT_STATUSES.len() as i64,
            "{}",
            org.slug
        );
    }
}

/// A signup killed after it took a warm schema (its backend terminated
/// while it waits on the slug's unique index) and one failing after the
/// take: no org, no user, and the schema is back in the pool for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signup_cut_off_mid_take_leaves_no_half_org_and_keeps_the_schema() {
    let db = TestDb::new().await;
    let template = std::sync::Arc::new(Template::embedded());
    tenantry::tenants::warm::fill(&db.pool, &template, 1)
        .await
        .unwrap();
    let warm = warm_ids(&db).await;

    // another transaction holds the slug, uncommitted
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO tenantry.organizations (id, slug, name, schema_name, status, template_version) \
         VALUES (gen_random_uuid(), 'victim', 'Holder', 't_holder', 'active', 1)",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let signup = {
        let (pool, template) = (db.pool.clone(), template.clone());
        tokio::spawn(
            async move { provision::create_org(&pool, &template, &new_org("victim")).await },
        )
    };
    // the signup's statement took the warm row and waits for the slug
    let pid: i32 = loop {
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE '%warm_schemas%' AND datname = current_database()",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(pid) = waiting {
            break pid;
        }
        tokio::task::yield_now().await;
    };
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(killed);
    assert!(signup.await.unwrap().is_err());
    holder.rollback().await.unwrap();

    assert_eq!(warm_ids(&db).await, warm);
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.organizations")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM tenantry.users").await, 0);

    // a failure after the take: rolled back the same way
    fn fail() -> Result<(), Error> {
        Err(Error::Conflict("injected failure".into()))
    }
    let err = provision::create_org_with_hook(&db.pool, &template, &new_org("victim"), Some(fail))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(warm_ids(&db).await, warm);
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.organizations")
            .await,
        0
    );

    let created = provision::create_org(&db.pool, &template, &new_org("victim"))
        .await
        .unwrap();
    assert_eq!(created.organization.id, warm[0]);
    assert_eq!(
        statuses_in(&db, &created.organization.schema_name).await,
        DEFAULT_STATUSES.len() as i64
    );
}

#[tokio::test]
async fn drain_drops_warm_schemas_and_their_roles_and_the_cli_reports_the_pool() {
    let db = TestDb::new().await;
    let (ok, out, err) = db.cli(&["warm", "fill", "3"]);
    assert!(ok, "{err}");
    assert!(out.contains("built 3 warm schema(s); 3 ready"), "{out}");
    let (ok, out, _) = db.cli(&["warm", "status", "--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["ready"], 3);
    assert_eq!(status["outdated"], 0);

    let warm = warm_ids(&db).await;
    let (ok, out, _) = db.cli(&["warm", "drain", "--keep", "1"]);
    assert!(ok);
    assert!(out.contains("dropped 2"), "{out}");
    // the oldest go first; their schemas and roles with them
    assert_eq!(warm_ids(&db).await, [warm[2]]);
    assert_eq!(tenant_schemas(&db).await, 1);
    // (roles are cluster-wide: count this pool's only)
    for (id, left) in [(warm[0], 0), (warm[1], 0), (warm[2], 1)] {
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) FROM pg_roles WHERE rolname = 't_{}'",
                id.simple()
            ))
            .await,
            left
        );
    }

    let (ok, _, err) = db.cli(&["warm", "fill", "20000"]);
    assert!(!ok);
    assert!(err.contains("20000"), "{err}");
    let (ok, _, err) = db.cli(&["serve", "--warm-schemas=20000"]);
    assert!(!ok);
    assert!(err.contains("--warm-schemas"), "{err}");
    assert_eq!(warm_ids(&db).await, [warm[2]]);
}

/// A tenant template naming a relation or routine like the shared schema
/// is refused with the clashing names, whatever the SQL's spelling (a
/// quoted name, a view, a rename), and so is a shared migration that would
/// clash with the tenant template: its transaction rolls back, leaving the
/// shared schema as it was. The real templates pass.
#[tokio::test]
async fn a_tenant_template_that_shadows_a_shared_table_is_refused() {
    use tenantry::tenants::shared::{embedded_template, migrate};
    let db = TestDb::new().await;
    let shared = embedded_template();
    migrate(&db.pool, &shared, &Template::embedded())
        .await
        .expect("the real templates do not clash");
    let v1 = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tenant_template/V1__initial.sql"),
    )
    .unwrap();
    for (later, clash) in [
        (
            "CREATE TABLE \"catalog_statuses\" (id int);",
            "catalog_statuses",
        ),
        (
            "CREATE VIEW catalog_behaviors AS SELECT * FROM behaviors;",
            "catalog_behaviors",
        ),
        (
            "ALTER TABLE tests RENAME TO catalog_behaviors;",
            "catalog_behaviors",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("V1__initial.sql"), &v1).unwrap();
        std::fs::write(dir.path().join("V2__clash.sql"), later).unwrap();
        let tenant = Template::from_dir(dir.path()).unwrap();
        let err = migrate(&db.pool, &shared, &tenant)
            .await
            .expect_err(later)
            .to_string();
        assert!(
            err.contains(clash) && err.contains("shared"),
            "{later}: {err}"
        );
    }
    // a shared migration that grows a name a tenant has
    let dir = tempfile::tempdir().unwrap();
    for m in shared.migrations() {
        std::fs::write(dir.path().join(format!("{m}.sql")), m.sql().unwrap()).unwrap();
    }
    std::fs::write(
        dir.path().join("V2__plans.sql"),
        "CREATE TABLE plans (id int); CREATE FUNCTION tests() RETURNS int LANGUAGE sql AS 'SELECT 1';",
    )
    .unwrap();
    let grown = Template::from_dir(dir.path()).unwrap();
    let err = migrate(&db.pool, &grown, &Template::embedded())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("tests"), "{err}");
    // rolled back: no new table, no history row, no scratch schema
    assert_eq!(
        db.tables("shared").await,
        ["catalog_behaviors", "catalog_statuses", HISTORY_TABLE]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM shared.refinery_schema_history")
            .await,
        1
    );
    assert!(!db.schema_exists("tenantry_check_tenant").await);
}

/// A new org's initial statuses and behaviors are the catalog's initial
/// presets at its signup, also when it takes a schema from the warm pool
/// that was built before the catalog changed.
#[tokio::test]
async fn new_orgs_start_from_the_catalog_as_it_is_at_signup() {
    use tenantry::tenants::catalog::{self, CatalogKind};
    let db = TestDb::new().await;
    let template = Template::embedded();
    tenantry::tenants::warm::fill(&db.pool, &template, 1)
        .await
        .unwrap();
    catalog::create(
        &db.pool,
        CatalogKind::Statuses,
        "Triage",
        Some("first look"),
        true,
    )
    .await
    .unwrap();
    catalog::create(&db.pool, CatalogKind::Statuses, "Optional", None, false)
        .await
        .unwrap();
    let warm = provision::create_org(&db.pool, &template, &new_org("from-warm"))
        .await
        .unwrap();
    assert!(warm.from_warm_pool);
    let fresh = provision::create_org(&db.pool, &template, &new_org("built-now"))
        .await
        .unwrap();
    assert!(!fresh.from_warm_pool);
    for org in [&warm.organization, &fresh.organization] {
        let names: Vec<(String, Option<String>)> = sqlx::query_as(&format!(
            "SELECT name, description FROM {}.statuses ORDER BY name",
            org.schema_name.quoted()
        ))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            names,
            [
                ("Active".to_owned(), None),
                ("Archived".to_owned(), None),
                ("New".to_owned(), None),
                ("Triage".to_owned(), Some("first look".to_owned())),
            ],
            "{}",
            org.slug
        );
    }
    // a schema built after the change carries it already: the signup
    // keeps the rows written at the build
    tenantry::tenants::warm::fill(&db.pool, &template, 1)
        .await
        .unwrap();
    let again = provision::create_org(&db.pool, &template, &new_org("warm-again"))
        .await
        .unwrap();
    assert!(again.from_warm_pool);
    let schema = again.organization.schema_name.quoted();
    let (names, built_before): (Vec<String>, bool) = sqlx::query_as(&format!(
        "SELECT array_agg(s.name ORDER BY s.name), \
                max(s.created_at) < (SELECT created_at FROM tenantry.organizations WHERE slug = 'warm-again') \
         FROM {schema}.statuses s"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(names, ["Active", "Archived", "New", "Triage"]);
    assert!(
        built_before,
        "the initial data was written when the schema was built"
    );
}
