//! Provisioning, the registry and the CLI against a real PostgreSQL.

mod common;

use common::TestDb;
use tenantry::error::Error;
use tenantry::ident::Slug;
use tenantry::provision::{self, NewOrg, DEFAULT_BEHAVIORS, DEFAULT_STATUSES};
use tenantry::registry::{self, OrgStatus};
use tenantry::template::{Template, TemplateError, HISTORY_TABLE};

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
        ["behaviors", HISTORY_TABLE, "statuses", "tests"]
    );
    // refinery's history lives in the tenant schema, nowhere else
    let history_schemas: Vec<String> = sqlx::query_scalar(
        "SELECT schemaname::text FROM pg_tables WHERE tablename = $1 ORDER BY 1",
    )
    .bind(HISTORY_TABLE)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(history_schemas, [schema, "tenantry"]);
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
    let schema = tenantry::ident::SchemaName::for_org(&new.id);
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
    let squatted = tenantry::ident::SchemaName::for_org(&new.id);
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
        let quoted = tenantry::ident::quote_ident(name);
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
