//! Black-box tests of the HTTP API: a real server on port 0 over a real
//! PostgreSQL, spoken to over HTTP.

mod common;

use common::spawn_app;
use reqwest::Method;
use std::time::Duration;

use serde_json::{json, Value};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PATCH: Method = Method::PATCH;
const DELETE: Method = Method::DELETE;

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Serving connections take the path this run configures. Direct: each
/// is a session of its own, with the empty session search_path. Through
/// PgBouncer (transaction pooling): concurrent requests of many orgs share
/// fewer server sessions than tenantry has client connections.
#[tokio::test]
async fn serving_connections_take_the_configured_path() {
    // six requests of each org at once: no per-org limit in the way
    let app = common::spawn_app_with(tenantry::server::ServerConfig {
        router: tenantry::serving::router::RouterConfig {
            fairness: Some(tenantry::serving::fairness::FairnessConfig {
                max_in_flight: 0,
                queue: Duration::ZERO,
            }),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut tokens = vec![];
    for i in 0..8 {
        let slug = format!("path-{i}");
        tokens.push((slug.clone(), app.org_with_token(&slug).await));
    }
    let mut requests = vec![];
    for round in 0..6 {
        for (slug, token) in &tokens {
            let (app_url, http, token) = (
                app.url(&format!("/v1/orgs/{slug}/tests?limit={}", 1 + round)),
                app.http.clone(),
                token.clone(),
            );
            requests.push(tokio::spawn(async move {
                let res = http.get(app_url).bearer_auth(token).send().await.unwrap();
                res.status().as_u16()
            }));
        }
    }
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    let tenant_connections = app.state.tenancy.router().tenant_pool().size() as usize;
    if common::pooler_run() {
        let (clients, servers) = common::bouncer().sessions(&app.db.name).await;
        println!(
            "tenantry: {tenant_connections} tenant connections; pgbouncer: {clients} clients, {servers} servers"
        );
        assert!(
            clients > common::pgbouncer::POOL_SIZE as usize,
            "{clients} clients"
        );
        assert!(
            (1..=common::pgbouncer::POOL_SIZE as usize).contains(&servers),
            "{servers} server sessions"
        );
    } else {
        assert!(tenant_connections > 1);
        let mut conn = app
            .state
            .tenancy
            .router()
            .control_pool()
            .acquire()
            .await
            .unwrap();
        let path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(path, "\"\"");
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "ready");
}

#[tokio::test]
async fn authentication_failures_are_401_with_json() {
    let app = spawn_app().await;
    let token = app.org_with_token("auth-org").await;
    let path = "/v1/orgs/auth-org/statuses";
    let res = app.http.get(app.url(path)).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    for bad in [
        "Bearer",
        "Bearer ",
        "Basic Zm9vOmJhcg==",
        "Bearer tny_00000000_0000000000000000000000000000000000000000000000000000000000000000",
        "Bearer not-a-token",
        "Bearer ' OR 1=1 --",
    ] {
        let res = app
            .http
            .get(app.url(path))
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{bad}");
    }
    // a tampered copy of a valid token
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'a' { 'b' } else { 'a' });
    let (s, b) = app.call(GET, path, &tampered, None).await;
    assert_error(s, &b, 401, "unauthorized");
    let (s, _) = app.call(GET, path, &token, None).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn revoked_token_stops_working_at_once() {
    let app = spawn_app().await;
    app.org_with_token("rev").await;
    let (s, body) = app
        .call(
            POST,
            "/v1/admin/orgs/rev/tokens",
            &app.superuser,
            Some(json!({"email": "x@rev.test", "name": "ci"})),
        )
        .await;
    assert_eq!(s, 201);
    let token = body["token"]["token"].as_str().unwrap().to_owned();
    let id = body["token"]["id"].as_str().unwrap().to_owned();
    assert!(body["token"].get("secret_hash").is_none());
    // warm the principal cache
    let (s, _) = app.call(GET, "/v1/orgs/rev/tests", &token, None).await;
    assert_eq!(s, 200);
    let (s, _) = app
        .call(
            DELETE,
            &format!("/v1/admin/tokens/{id}"),
            &app.superuser,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, b) = app.call(GET, "/v1/orgs/rev/tests", &token, None).await;
    assert_error(s, &b, 401, "unauthorized");
    let (s, b) = app
        .call(
            DELETE,
            &format!("/v1/admin/tokens/{id}"),
            &app.superuser,
            None,
        )
        .await;
    assert_error(s, &b, 404, "not_found");
}

#[tokio::test]
async fn statuses_and_behaviors_crud() {
    let app = spawn_app().await;
    let token = app.org_with_token("crud").await;
    for kind in ["statuses", "behaviors"] {
        let base = format!("/v1/orgs/crud/{kind}");
        let (s, list) = app.call(GET, &base, &token, None).await;
        assert_eq!(s, 200);
        assert_eq!(list["items"].as_array().unwrap().len(), 3, "initial data");
        assert!(list["next_cursor"].is_null());

        let (s, created) = app
            .call(
                POST,
                &base,
                &token,
                Some(json!({"name": "Custom", "description": "mine"})),
            )
            .await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_owned();
        assert_eq!(created["name"], "Custom");
        assert_eq!(created["created_by"], created["updated_by"]);

        let (s, got) = app.call(GET, &format!("{base}/{id}"), &token, None).await;
        assert_eq!(s, 200);
        assert_eq!(got, created);

        // partial update: name only keeps the description
        let (s, upd) = app
            .call(
                PATCH,
                &format!("{base}/{id}"),
                &token,
                Some(json!({"name": "Renamed"})),
            )
            .await;
        assert_eq!(s, 200, "{upd}");
        assert_eq!(upd["name"], "Renamed");
        assert_eq!(upd["description"], "mine");
        // null clears the description
        let (s, upd) = app
            .call(
                PATCH,
                &format!("{base}/{id}"),
                &token,
                Some(json!({"description": null})),
            )
            .await;
        assert_eq!(s, 200);
        assert!(upd["description"].is_null());
        assert_eq!(upd["name"], "Renamed");

        // duplicate name (case-insensitive) -> 409
        let (s, b) = app
            .call(POST, &base, &token, Some(json!({"name": "renamed"})))
            .await;
        assert_error(s, &b, 409, "conflict");

        let (s, _) = app
            .call(DELETE, &format!("{base}/{id}"), &token, None)
            .await;
        assert_eq!(s, 204);
        let (s, b) = app.call(GET, &format!("{base}/{id}"), &token, None).await;
        assert_error(s, &b, 404, "not_found");
        let (s, b) = app
            .call(DELETE, &format!("{base}/{id}"), &token, None)
            .await;
        assert_error(s, &b, 404, "not_found");
    }
}

async fn first_id(app: &common::TestApp, token: &str, kind: &str) -> String {
    let (_, list) = app
        .call(GET, &format!("/v1/orgs/crud-tests/{kind}"), token, None)
        .await;
    list["items"][0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn tests_crud_pagination_filters_and_authorship() {
    let app = spawn_app().await;
    let token = app.org_with_token("crud-tests").await;
    let status = first_id(&app, &token, "statuses").await;
    let behavior = first_id(&app, &token, "behaviors").await;
    let (_, statuses) = app
        .call(GET, "/v1/orgs/crud-tests/statuses", &token, None)
        .await;
    let other_status = statuses["items"][1]["id"].as_str().unwrap().to_owned();

    let mut ids = vec![];
    for i in 0..7 {
        let st = if i % 2 == 0 { &status } else { &other_status };
        let (s, t) = app
            .call(
                POST,
                "/v1/orgs/crud-tests/tests",
                &token,
                Some(json!({"prompt": format!("prompt {i}"), "expected_outcome": "ok", "behavior_id": behavior, "status_id": st})),
            )
            .await;
        assert_eq!(s, 201, "{t}");
        ids.push(t["id"].as_str().unwrap().to_owned());
    }
    // created_by is the token's user, not the org owner or the superuser
    let (_, me) = app
        .call(
            GET,
            &format!("/v1/orgs/crud-tests/tests/{}", ids[0]),
            &token,
            None,
        )
        .await;
    let user: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM tenantry.users WHERE email = 'member@crud-tests.test'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(me["created_by"], user.to_string());

    // pages of 3 walk all 7 rows exactly once
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/orgs/crud-tests/tests?limit=3&cursor={c}"),
            None => "/v1/orgs/crud-tests/tests?limit=3".to_string(),
        };
        let (s, page) = app.call(GET, &path, &token, None).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        for t in page["items"].as_array().unwrap() {
            seen.push(t["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);

    let (_, filtered) = app
        .call(
            GET,
            &format!("/v1/orgs/crud-tests/tests?status_id={status}"),
            &token,
            None,
        )
        .await;
    let items = filtered["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert!(items.iter().all(|t| t["status_id"] == status.as_str()));

    // update by another user records updated_by
    let (s, other) = app
        .call(
            POST,
            "/v1/admin/orgs/crud-tests/tokens",
            &app.superuser,
            Some(json!({"email": "editor@crud-tests.test"})),
        )
        .await;
    assert_eq!(s, 201);
    let editor = other["token"]["token"].as_str().unwrap();
    let (s, upd) = app
        .call(
            PATCH,
            &format!("/v1/orgs/crud-tests/tests/{}", ids[0]),
            editor,
            Some(json!({"prompt": "changed"})),
        )
        .await;
    assert_eq!(s, 200, "{upd}");
    assert_eq!(upd["prompt"], "changed");
    assert_eq!(upd["expected_outcome"], "ok");
    assert_eq!(upd["created_by"], user.to_string());
    assert_eq!(upd["updated_by"], other["user"]["id"]);

    // a status in use cannot be deleted
    let (s, b) = app
        .call(
            DELETE,
            &format!("/v1/orgs/crud-tests/statuses/{status}"),
            &token,
            None,
        )
        .await;
    assert_error(s, &b, 409, "conflict");

    let (s, _) = app
        .call(
            DELETE,
            &format!("/v1/orgs/crud-tests/tests/{}", ids[0]),
            &token,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, b) = app
        .call(
            GET,
            &format!("/v1/orgs/crud-tests/tests/{}", ids[0]),
            &token,
            None,
        )
        .await;
    assert_error(s, &b, 404, "not_found");
}

#[tokio::test]
async fn client_errors_get_precise_statuses_never_500() {
    let app = spawn_app().await;
    let token = app.org_with_token("errs").await;
    let base = "/v1/orgs/errs/statuses";

    // 422 with field details
    for (body, field) in [
        (json!({"name": ""}), "name"),
        (json!({"name": "x".repeat(101)}), "name"),
        (json!({"name": " padded "}), "name"),
        (json!({"name": "nul\u{0}byte"}), "name"),
        (
            json!({"name": "ok", "description": "d".repeat(2001)}),
            "description",
        ),
    ] {
        let (s, b) = app.call(POST, base, &token, Some(body)).await;
        assert_error(s, &b, 422, "validation_failed");
        assert!(b["error"]["details"]["fields"][field].is_string(), "{b}");
    }
    // wrong shapes: 422
    for body in [
        json!({}),
        json!({"name": 5}),
        json!({"name": "a", "extra": 1}),
        json!([1, 2]),
    ] {
        let (s, b) = app.call(POST, base, &token, Some(body)).await;
        assert_error(s, &b, 422, "validation_failed");
    }
    // malformed JSON: 400
    let res = app
        .req(POST, base, &token)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"]["code"],
        "malformed_json"
    );
    // wrong content type: 415
    let res = app
        .req(POST, base, &token)
        .header("content-type", "text/plain")
        .body("{\"name\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"]["code"],
        "unsupported_media_type"
    );
    // too large: 413
    let huge = json!({"name": "big", "description": "x".repeat(tenantry::api::BODY_LIMIT)});
    let (s, b) = app.call(POST, base, &token, Some(huge)).await;
    assert_error(s, &b, 413, "payload_too_large");
    // bad ids and queries: 400; unknown ids: 404
    let (s, b) = app
        .call(GET, &format!("{base}/not-a-uuid"), &token, None)
        .await;
    assert_error(s, &b, 400, "invalid_path");
    let (s, b) = app
        .call(
            GET,
            &format!("{base}/{}", uuid::Uuid::new_v4()),
            &token,
            None,
        )
        .await;
    assert_error(s, &b, 404, "not_found");
    for q in ["limit=0", "limit=201", "limit=abc", "cursor=zzz", "bogus=1"] {
        let (s, b) = app.call(GET, &format!("{base}?{q}"), &token, None).await;
        assert_error(s, &b, 400, "invalid_query");
    }
    // a test pointing at a status that does not exist: 422 on that field
    let (_, behaviors) = app.call(GET, "/v1/orgs/errs/behaviors", &token, None).await;
    let behavior = behaviors["items"][0]["id"].clone();
    let (s, b) = app
        .call(
            POST,
            "/v1/orgs/errs/tests",
            &token,
            Some(json!({"prompt": "p", "expected_outcome": "", "behavior_id": behavior, "status_id": uuid::Uuid::new_v4()})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
    assert!(
        b["error"]["details"]["fields"]["status_id"].is_string(),
        "{b}"
    );
    let (s, b) = app
        .call(POST, "/v1/orgs/errs/tests", &token, Some(json!({"prompt": "", "expected_outcome": "", "behavior_id": behavior, "status_id": behavior})))
        .await;
    assert_error(s, &b, 422, "validation_failed");
    // unknown route and method
    let (s, b) = app.call(GET, "/v1/nope", &token, None).await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app.call(Method::PUT, base, &token, Some(json!({}))).await;
    assert_error(s, &b, 405, "method_not_allowed");
}

#[tokio::test]
async fn other_orgs_are_invisible_and_superusers_see_all() {
    let app = spawn_app().await;
    let alpha = app.org_with_token("alpha").await;
    let beta = app.org_with_token("beta").await;
    // beta's token on alpha: the same 404 as for an org that does not exist
    let (s, cross) = app.call(GET, "/v1/orgs/alpha/tests", &beta, None).await;
    assert_error(s, &cross, 404, "not_found");
    let (s, missing) = app.call(GET, "/v1/orgs/gamma/tests", &beta, None).await;
    assert_error(s, &missing, 404, "not_found");
    assert_eq!(
        cross["error"]["message"]
            .as_str()
            .unwrap()
            .replace("alpha", "X"),
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .replace("gamma", "X")
    );
    // writes too
    let (s, _) = app
        .call(
            POST,
            "/v1/orgs/alpha/statuses",
            &beta,
            Some(json!({"name": "evil"})),
        )
        .await;
    assert_eq!(s, 404);
    // invalid slugs are not found either (no parser details leak)
    let (s, b) = app
        .call(GET, "/v1/orgs/Alpha%22%3B/tests", &beta, None)
        .await;
    assert_error(s, &b, 404, "not_found");
    // superuser reaches both
    for org in ["alpha", "beta"] {
        let (s, _) = app
            .call(
                GET,
                &format!("/v1/orgs/{org}/statuses"),
                &app.superuser,
                None,
            )
            .await;
        assert_eq!(s, 200);
    }
    // org tokens cannot administer
    let (s, b) = app.call(GET, "/v1/admin/orgs", &alpha, None).await;
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs",
            &alpha,
            Some(json!({"slug": "x1", "name": "x"})),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");
}

#[tokio::test]
async fn admin_lifecycle_suspend_rename_delete() {
    let app = spawn_app().await;
    let token = app.org_with_token("life").await;
    let (s, _) = app.call(GET, "/v1/orgs/life/tests", &token, None).await;
    assert_eq!(s, 200); // now cached

    let (s, org) = app
        .call(POST, "/v1/admin/orgs/life/suspend", &app.superuser, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(org["status"], "suspended");
    let (s, b) = app.call(GET, "/v1/orgs/life/tests", &token, None).await;
    assert_error(s, &b, 403, "org_suspended");
    let (s, b) = app
        .call(POST, "/v1/admin/orgs/life/suspend", &app.superuser, None)
        .await;
    assert_error(s, &b, 409, "invalid_state");
    let (s, _) = app
        .call(POST, "/v1/admin/orgs/life/resume", &app.superuser, None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = app.call(GET, "/v1/orgs/life/tests", &token, None).await;
    assert_eq!(s, 200);

    let (s, org) = app
        .call(
            POST,
            "/v1/admin/orgs/life/rename",
            &app.superuser,
            Some(json!({"new_slug": "renewed"})),
        )
        .await;
    assert_eq!(s, 200, "{org}");
    // the schema stays with the org (named after its id)
    assert_eq!(org["schema_name"], app.db.schema_of("renewed").await);
    let (s, _) = app.call(GET, "/v1/orgs/life/tests", &token, None).await;
    assert_eq!(s, 404);
    let (s, page) = app
        .call(GET, "/v1/orgs/renewed/statuses", &token, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs/renewed/rename",
            &app.superuser,
            Some(json!({"new_slug": "Bad Slug"})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");

    let (s, got) = app
        .call(GET, "/v1/admin/orgs/renewed", &app.superuser, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(got["slug"], "renewed");
    let (s, list) = app.call(GET, "/v1/admin/orgs", &app.superuser, None).await;
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["next_cursor"].is_null());

    let (s, _) = app
        .call(DELETE, "/v1/admin/orgs/renewed", &app.superuser, None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .call(GET, "/v1/orgs/renewed/statuses", &app.superuser, None)
        .await;
    assert_eq!(s, 404);
    let (s, b) = app
        .call(DELETE, "/v1/admin/orgs/renewed", &app.superuser, None)
        .await;
    assert_error(s, &b, 404, "not_found");
    // the member token died with its org
    let (s, _) = app
        .call(GET, "/v1/orgs/renewed/statuses", &token, None)
        .await;
    assert!(s == 401 || s == 404, "{s}");
}

#[tokio::test]
async fn admin_create_validates_and_conflicts() {
    let app = spawn_app().await;
    let su = app.superuser.clone();
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs",
            &su,
            Some(json!({"slug": "x\"; drop", "name": "x"})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
    assert!(
        b["error"]["details"]["fields"]["slug"]
            .as_str()
            .unwrap()
            .contains("'\"'"),
        "{b}"
    );
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs",
            &su,
            Some(json!({"slug": "admin", "name": "x"})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs",
            &su,
            Some(json!({"slug": "okay", "name": "x", "owner_email": "nope"})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
    let (s, _) = app
        .call(
            POST,
            "/v1/admin/orgs",
            &su,
            Some(json!({"slug": "okay", "name": "x"})),
        )
        .await;
    assert_eq!(s, 201);
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs",
            &su,
            Some(json!({"slug": "okay", "name": "x"})),
        )
        .await;
    assert_error(s, &b, 409, "conflict");
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs/nope/tokens",
            &su,
            Some(json!({"email": "a@b.c"})),
        )
        .await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/orgs/okay/tokens",
            &su,
            Some(json!({"email": "bad"})),
        )
        .await;
    assert_error(s, &b, 422, "validation_failed");
}

#[tokio::test]
async fn a_second_process_converges_on_suspend_and_rename() {
    let a = spawn_app().await;
    let token = a.org_with_token("shared").await;
    let b_db = common::TestDb {
        pool: a.db.pool.clone(),
        url: a.db.url.clone(),
        name: a.db.name.clone(),
    };
    let b = common::spawn_app_on(b_db, tenantry::server::ServerConfig::default()).await;
    let (s, _) = b.call(GET, "/v1/orgs/shared/tests", &token, None).await;
    assert_eq!(s, 200); // b has it cached now
    let (s, _) = a
        .call(POST, "/v1/admin/orgs/shared/suspend", &a.superuser, None)
        .await;
    assert_eq!(s, 200);
    // b hears about it through LISTEN/NOTIFY, well before its 30 s TTL
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (s, _) = b.call(GET, "/v1/orgs/shared/tests", &token, None).await;
        if s == 403 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "second process still serves a suspended org"
        );
        tokio::task::yield_now().await;
    }
}

/// Walking `GET /v1/admin/orgs` page by page while orgs are being created
/// returns every org that existed throughout exactly once, and no org twice.
#[tokio::test]
async fn admin_org_pages_list_every_org_once_under_concurrent_creates() {
    let app = spawn_app().await;
    let mut before = std::collections::BTreeSet::new();
    for i in 0..30 {
        let slug = format!("page-{i:02}");
        let (s, b) = app
            .call(
                POST,
                "/v1/admin/orgs",
                &app.superuser,
                Some(json!({"slug": slug, "name": "Paged"})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        before.insert(slug);
    }
    // creates interleaved with the walk: slugs sorting before, among and
    // after the existing ones
    let creator = {
        let (http, url, token) = (
            app.http.clone(),
            app.url("/v1/admin/orgs"),
            app.superuser.clone(),
        );
        tokio::spawn(async move {
            for i in 0..20 {
                let slug = format!("{}-new-{i:02}", ["a", "page-1", "zz"][i % 3]);
                let res = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"slug": slug, "name": "New"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
            }
        })
    };
    let mut seen = vec![];
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/admin/orgs?limit=7&cursor={c}"),
            None => "/v1/admin/orgs?limit=7".to_string(),
        };
        let (s, page) = app.call(GET, &path, &app.superuser, None).await;
        assert_eq!(s, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 7);
        seen.extend(items.iter().map(|o| o["slug"].as_str().unwrap().to_owned()));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    creator.await.unwrap();
    assert!(pages >= 5);
    let unique: std::collections::BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "an org was listed twice: {seen:?}"
    );
    assert!(before.is_subset(&unique), "an org was missed: {seen:?}");
    // a walk after the creates sees all 50
    let (_, all) = app
        .call(GET, "/v1/admin/orgs?limit=1000", &app.superuser, None)
        .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 50);
    for bad in [
        "limit=0",
        "limit=1001",
        "cursor=Not%20A%20Slug",
        "color=red",
    ] {
        let (s, b) = app
            .call(GET, &format!("/v1/admin/orgs?{bad}"), &app.superuser, None)
            .await;
        assert_error(s, &b, 400, "invalid_query");
    }
}

/// Invariant 8: a process whose cache still maps `acme` to the org that was
/// renamed away (its listener is off, so it never hears of the rename) must
/// not send that org's token into the schema of the new org now called
/// `acme`. Schemas belong to org ids, so the stale entry can only reach the
/// old org's own data.
#[tokio::test]
async fn a_stale_cache_never_routes_a_reused_slug_into_the_new_orgs_schema() {
    use tenantry::server::ServerConfig;
    let deaf = ServerConfig {
        listen_for_changes: false,
        router: tenantry::serving::router::RouterConfig {
            ttl: std::time::Duration::from_secs(600),
            ..Default::default()
        },
        auth: tenantry::serving::auth::AuthConfig {
            ttl: std::time::Duration::from_secs(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let a = common::spawn_app_with(deaf).await;
    let old_token = a.org_with_token("acme").await;
    let (s, old_status) = a
        .call(
            POST,
            "/v1/orgs/acme/statuses",
            &old_token,
            Some(json!({"name": "old-acme-row"})),
        )
        .await;
    assert_eq!(s, 201, "{old_status}");
    // a has `acme` -> old org cached now
    let (s, _) = a
        .call(GET, "/v1/orgs/acme/statuses", &old_token, None)
        .await;
    assert_eq!(s, 200);

    let b_db = common::TestDb {
        pool: a.db.pool.clone(),
        url: a.db.url.clone(),
        name: a.db.name.clone(),
    };
    let b = common::spawn_app_on(b_db, ServerConfig::default()).await;
    let (s, body) = b
        .call(
            POST,
            "/v1/admin/orgs/acme/rename",
            &b.superuser,
            Some(json!({"new_slug": "acme-old"})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let new_token = b.org_with_token("acme").await;
    let (s, new_status) = b
        .call(
            POST,
            "/v1/orgs/acme/statuses",
            &new_token,
            Some(json!({"name": "new-acme-secret"})),
        )
        .await;
    assert_eq!(s, 201, "{new_status}");
    assert_ne!(
        a.db.schema_of("acme").await,
        a.db.schema_of("acme-old").await
    );

    // a still believes `acme` is the old org: the old token reaches only the
    // old org's rows, never the new org's
    for path in [
        "/v1/orgs/acme/statuses".to_string(),
        format!(
            "/v1/orgs/acme/statuses/{}",
            new_status["id"].as_str().unwrap()
        ),
    ] {
        let res = a.req(GET, &path, &old_token).send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        assert!(
            !text.contains("new-acme-secret"),
            "{path}: stale cache leaked the new org's data: {text}"
        );
        assert!(matches!(status, 200 | 404), "{path}: {status} {text}");
    }
    let (s, page) = a
        .call(GET, "/v1/orgs/acme/statuses", &old_token, None)
        .await;
    assert_eq!(s, 200);
    assert!(page.to_string().contains("old-acme-row"), "{page}");
    // the new org's token resolves its own org by id, whatever a holds
    // under the slug: it reaches the new org's rows, never the old org's
    let (s, page) = a
        .call(GET, "/v1/orgs/acme/statuses", &new_token, None)
        .await;
    assert_eq!(s, 200, "{page}");
    assert!(page.to_string().contains("new-acme-secret"), "{page}");
    assert!(!page.to_string().contains("old-acme-row"), "{page}");
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/orgs/{slug}/statuses", &["get", "post"][..]),
        (
            "/v1/orgs/{slug}/statuses/{id}",
            &["get", "patch", "delete"][..],
        ),
        ("/v1/orgs/{slug}/behaviors", &["get", "post"][..]),
        (
            "/v1/orgs/{slug}/behaviors/{id}",
            &["get", "patch", "delete"][..],
        ),
        ("/v1/orgs/{slug}/tests", &["get", "post"][..]),
        (
            "/v1/orgs/{slug}/tests/{id}",
            &["get", "patch", "delete"][..],
        ),
        ("/v1/admin/orgs", &["get", "post"][..]),
        ("/v1/admin/orgs/{slug}", &["get", "delete"][..]),
        ("/v1/admin/orgs/{slug}/suspend", &["post"][..]),
        ("/v1/admin/orgs/{slug}/resume", &["post"][..]),
        ("/v1/admin/orgs/{slug}/rename", &["post"][..]),
        ("/v1/admin/orgs/{slug}/tokens", &["post"][..]),
        ("/v1/admin/tokens/{id}", &["delete"][..]),
        ("/v1/admin/stats", &["get"][..]),
        ("/healthz", &["get"][..]),
        ("/readyz", &["get"][..]),
    ] {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from OpenAPI"));
        for m in methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing from OpenAPI");
        }
    }
}

/// Every status an operation answers is in the OpenAPI document: each
/// documented operation is called with the invalid inputs it can receive
/// (no token, another org's token, a suspended org, malformed JSON, a wrong
/// content type, a malformed path parameter) and every status seen must be
/// listed for that operation, with the error body.
#[tokio::test]
async fn every_status_an_operation_answers_is_documented() {
    let app = spawn_app().await;
    let token = app.org_with_token("doc-a").await;
    let other = app.org_with_token("doc-b").await;
    app.org_with_token("doc-off").await;
    let (s, _) = app
        .call(POST, "/v1/admin/orgs/doc-off/suspend", &app.superuser, None)
        .await;
    assert_eq!(s, 200);
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let some_id = uuid::Uuid::new_v4().to_string();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            for (status, code) in documented
                .iter()
                .map(|c| (c, op["responses"][c.to_string()].clone()))
            {
                if *status >= 400 {
                    let schema = &code["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(
                        schema, "#/components/schemas/ErrorBody",
                        "{method} {path} {status}"
                    );
                }
            }
            let fill = |slug: &str, id: &str| path.replace("{slug}", slug).replace("{id}", id);
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let has_body = op.get("requestBody").is_some();
            let mut cases: Vec<(String, reqwest::RequestBuilder)> = vec![
                (
                    "no token".into(),
                    app.http
                        .request(m.clone(), app.url(&fill("doc-a", &some_id))),
                ),
                (
                    "another org's token".into(),
                    app.req(m.clone(), &fill("doc-a", &some_id), &other),
                ),
                (
                    "a suspended org".into(),
                    app.req(m.clone(), &fill("doc-off", &some_id), &app.superuser),
                ),
                (
                    "a malformed path parameter".into(),
                    app.req(m.clone(), &fill("Not A Slug", "not-a-uuid"), &token),
                ),
                (
                    "an unknown query parameter".into(),
                    app.req(
                        m.clone(),
                        &format!("{}?bogus=1", fill("doc-a", &some_id)),
                        &token,
                    ),
                ),
            ];
            if has_body {
                cases.push((
                    "malformed JSON".into(),
                    app.req(m.clone(), &fill("doc-a", &some_id), &token)
                        .header("content-type", "application/json")
                        .body("{nope"),
                ));
                cases.push((
                    "a wrong content type".into(),
                    app.req(m.clone(), &fill("doc-a", &some_id), &token)
                        .header("content-type", "text/plain")
                        .body("{}"),
                ));
                cases.push((
                    "a body of the wrong shape".into(),
                    app.req(m.clone(), &fill("doc-a", &some_id), &app.superuser)
                        .json(&json!({"unexpected": true})),
                ));
            }
            for (what, req) in cases {
                let res = req.send().await.unwrap();
                let status = res.status().as_u16();
                assert!(
                    documented.contains(&status),
                    "{} {path} with {what} answered {status}, which the document does not list ({documented:?}): {}",
                    method.to_uppercase(),
                    res.text().await.unwrap()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked}");
}

/// The README's first quick-start command: `tenantry serve` with no
/// DATABASE_URL runs its own cluster in a data directory, prints a bootstrap
/// token once, serves, stops cleanly on SIGTERM, and reuses the data on the
/// next start.
#[tokio::test]
async fn zero_config_serve_bootstraps_serves_and_restarts() {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("serve.log");
    let start = |bind: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args([
                "serve",
                "--log-format",
                "json",
                "--bind",
                bind,
                "--data-dir",
            ])
            .arg(data.path().join("tenantry"))
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };

    let mut first = start("127.0.0.1:0");
    let (addr, printed) = common::until_listening(&mut first).await;
    let token = common::bootstrap_token(&printed);
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{addr}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{addr}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let res = http
        .post(format!("{addr}/v1/admin/orgs"))
        .bearer_auth(&token)
        .json(&json!({"slug": "kept", "name": "Kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    common::terminate(first).await;
    assert!(
        !data.path().join("tenantry/pgdata/postmaster.pid").exists(),
        "the local cluster must be stopped with the server"
    );

    let mut second = start("127.0.0.1:0");
    let (addr, printed) = common::until_listening(&mut second).await;
    assert!(
        !printed.iter().any(|l| l.starts_with("tny_")),
        "token printed twice: {printed:?}"
    );
    let res = http
        .get(format!("{addr}/v1/orgs/kept/statuses"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "data and token survive a restart");
    let res = http
        .get(format!("{addr}/v1/orgs/kept/tests"))
        .header("x-request-id", "logged-42")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    common::terminate(second).await;
    // the request log: one JSON line per request, its fields once
    let written = std::fs::read_to_string(&log).unwrap();
    let line = written
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "request done" && l["span"]["id"] == "logged-42")
        .unwrap_or_else(|| panic!("no request line for logged-42 in:\n{written}"));
    assert_eq!(line["span"]["status"], 200, "{line}");
    assert!(line.get("spans").is_none(), "{line}");
}

/// Every response carries a request id: the client's `x-request-id` when
/// usable, a generated one otherwise; error bodies name it too, whatever
/// produced the error (auth, validation, routing fallback, bad JSON).
#[tokio::test]
async fn every_response_carries_a_request_id_and_error_bodies_name_it() {
    let app = spawn_app().await;
    let id_of = |res: &reqwest::Response| {
        res.headers()
            .get("x-request-id")
            .expect("x-request-id on every response")
            .to_str()
            .unwrap()
            .to_owned()
    };
    // the client's id is kept, in the header and the error body
    let res = app
        .http
        .get(app.url("/v1/orgs/acme/tests"))
        .header("x-request-id", "trace-abc/123 x")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&res), "trace-abc/123 x");
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    assert_error(status, &body, 401, "unauthorized");
    assert_eq!(body["error"]["request_id"], "trace-abc/123 x", "{body}");

    // generated when absent: distinct, on successes too
    let a = app.http.get(app.url("/healthz")).send().await.unwrap();
    let b = app.http.get(app.url("/healthz")).send().await.unwrap();
    let (ida, idb) = (id_of(&a), id_of(&b));
    assert_eq!(ida.len(), 32, "{ida}");
    assert_ne!(ida, idb);
    assert_eq!(a.json::<Value>().await.unwrap()["status"], "ok");

    // unusable ids (too long, control characters) are replaced
    for bad in ["x".repeat(129), "tab\there".to_string()] {
        let res = app
            .http
            .get(app.url("/healthz"))
            .header("x-request-id", bad.as_str())
            .send()
            .await
            .unwrap();
        let id = id_of(&res);
        assert_ne!(id, bad);
        assert_eq!(id.len(), 32);
    }
    let ok_128 = "y".repeat(128);
    let res = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", ok_128.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&res), ok_128);

    // errors from the fallback, from the JSON extractor and from a handler
    let res = app
        .http
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    let id = id_of(&res);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    assert_eq!(body["error"]["request_id"], id.as_str(), "{body}");
    let res = app
        .http
        .post(app.url("/v1/admin/orgs"))
        .bearer_auth(&app.superuser)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let id = id_of(&res);
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], id.as_str(), "{body}");
    let (status, body) = app
        .call(
            POST,
            "/v1/admin/orgs",
            &app.superuser,
            Some(json!({"slug": "Bad Slug", "name": "x"})),
        )
        .await;
    assert_error(status, &body, 422, "validation_failed");
    assert_eq!(
        body["error"]["request_id"].as_str().map(str::len),
        Some(32),
        "{body}"
    );
}

/// `GET /metrics`: Prometheus text that a Prometheus parser reads, with the
/// documented families, counters that move with traffic, routes labelled by
/// template (never by org), and no per-tenant label.
#[tokio::test]
async fn metrics_are_prometheus_text_and_move_with_traffic() {
    let app = spawn_app().await;
    let token = app.org_with_token("metered").await;
    let scrape = |app: &common::TestApp| {
        let (http, url) = (app.http.clone(), app.url("/metrics"));
        async move {
            let res = http.get(url).send().await.unwrap();
            assert_eq!(res.status(), 200);
            let kind = res.headers()["content-type"].to_str().unwrap().to_owned();
            assert!(kind.starts_with("text/plain"), "{kind}");
            let text = res.text().await.unwrap();
            let lines = text.lines().map(|l| Ok(l.to_owned()));
            let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
            (text, parsed)
        }
    };
    // the recorder is process-wide (other tests' servers count too): compare
    // before and after, on labels only this test produces
    let value = |scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            })
            .sum()
    };
    let (_, before) = scrape(&app).await;
    let route = "/v1/orgs/:slug/tests";
    let get_tests = &[("method", "GET"), ("route", route), ("status", "2xx")][..];
    let before_ok = value(&before, "tenantry_http_requests_total", get_tests);
    let before_tx = value(
        &before,
        "tenantry_tenant_transactions_total",
        &[("event", "committed")],
    );
    for _ in 0..5 {
        let (status, _) = app.call(GET, "/v1/orgs/metered/tests", &token, None).await;
        assert_eq!(status, 200);
    }
    let (status, _) = app
        .call(GET, "/v1/orgs/metered/tests", "tny_bogus", None)
        .await;
    assert_eq!(status, 401);

    let (text, after) = scrape(&app).await;
    assert_eq!(
        value(&after, "tenantry_http_requests_total", get_tests) - before_ok,
        5.0,
        "{}",
        text.lines()
            .filter(|l| l.contains("requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        value(
            &after,
            "tenantry_http_requests_total",
            &[("route", route), ("status", "4xx")]
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "tenantry_http_errors_total",
            &[("code", "unauthorized")]
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "tenantry_tenant_transactions_total",
            &[("event", "committed")]
        ) - before_tx
            >= 5.0
    );
    assert!(
        value(
            &after,
            "tenantry_tenant_resolve_total",
            &[("result", "hit")]
        ) >= 4.0
    );
    assert!(value(&after, "tenantry_auth_lookups_total", &[("result", "hit")]) >= 4.0);
    assert!(
        value(
            &after,
            "tenantry_pool_connections",
            &[("pool", "tenants"), ("state", "max")]
        ) >= 1.0
    );
    assert!(
        text.contains("tenantry_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("tenantry_pool_acquire_seconds_bucket"),
        "{text}"
    );
    // routes by template, never a concrete org
    assert!(!text.contains("metered"), "{text}");

    // with a listener of its own, /metrics leaves the API's listener
    let bind = free_local_addr();
    let separate = common::spawn_app_with(tenantry::server::ServerConfig {
        metrics_bind: Some(bind),
        ..Default::default()
    })
    .await;
    let (status, body) = separate.call(GET, "/metrics", "", None).await;
    assert_error(status, &body, 404, "not_found");
    let text = scrape_listener(&separate, bind).await;
    assert!(text.contains("tenantry_http_requests_total"), "{text}");

    // a library user cannot put org names on the API's listener either
    let db = common::TestDb::new().await;
    let pools =
        tenantry::server::Pools::connect_lazy(db.pool.clone(), &db.url, &Default::default())
            .unwrap();
    let refused = tenantry::server::state(
        pools,
        &tenantry::server::ServerConfig {
            router: tenantry::serving::router::RouterConfig {
                top_tenants: 3,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    assert!(
        matches!(refused, Err(tenantry::Error::Validation { .. })),
        "top tenants without a metrics listener must be refused"
    );
}

/// A local address nothing listens on (for a listener a server binds).
fn free_local_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The text of `/metrics` on a metrics listener of its own.
async fn scrape_listener(app: &common::TestApp, bind: std::net::SocketAddr) -> String {
    for _ in 0..1000 {
        // the listener is bound before serve starts; the task may lag
        match app.http.get(format!("http://{bind}/metrics")).send().await {
            Ok(res) => return res.text().await.unwrap(),
            Err(_) => tokio::task::yield_now().await,
        }
    }
    panic!("no metrics listener on {bind}");
}

/// The per-org label is opt-in and bounded: with a top 2, the two orgs
/// with the most transactions appear with their counts, a third does not.
#[tokio::test]
async fn the_top_tenants_family_names_only_the_busiest_orgs() {
    let bind = free_local_addr();
    let app = common::spawn_app_with(tenantry::server::ServerConfig {
        router: tenantry::serving::router::RouterConfig {
            top_tenants: 2,
            ..Default::default()
        },
        metrics_bind: Some(bind),
        ..Default::default()
    })
    .await;
    for (slug, requests) in [("top-first", 5), ("top-second", 3), ("top-third", 1)] {
        let token = app.org_with_token(slug).await;
        for _ in 0..requests {
            let (status, _) = app
                .call(GET, &format!("/v1/orgs/{slug}/tests"), &token, None)
                .await;
            assert_eq!(status, 200);
        }
    }
    // org names never reach the API's listener
    let (status, body) = app.call(GET, "/metrics", "", None).await;
    assert_error(status, &body, 404, "not_found");
    let text = scrape_listener(&app, bind).await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let mut top: Vec<(String, f64)> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "tenantry_top_tenant_transactions")
        .filter_map(|s| {
            let org = s.labels.get("org")?;
            let prometheus_parse::Value::Gauge(v) = s.value else {
                return None;
            };
            org.starts_with("top-").then(|| (org.to_owned(), v))
        })
        .collect();
    top.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        top,
        [
            ("top-first".to_owned(), 5.0),
            ("top-second".to_owned(), 3.0)
        ],
        "{text}"
    );
}

/// `--pooler transaction` without an app URL would send admin work
/// (named statements, session advisory locks) through the pooler: refused
/// with a clear message before anything starts, as are out-of-range limits.
#[tokio::test]
async fn serve_refuses_pooler_and_limit_settings_it_cannot_honour() {
    let db = common::TestDb::empty().await;
    let (ok, _, err) = db.cli(&["serve", "--pooler", "transaction", "--bind", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(
        err.contains("--pooler transaction needs --app-database-url"),
        "{err}"
    );
    let (ok, _, err) = db.cli(&["serve", "--pooler", "session"]);
    assert!(!ok);
    assert!(err.contains("possible values: none, transaction"), "{err}");
    let (ok, _, err) = db.cli(&["serve", "--metrics-top-tenants", "5000"]);
    assert!(!ok);
    assert!(err.contains("--metrics-top-tenants"), "{err}");
    // org names in /metrics only on a listener of its own
    let (ok, _, err) = db.cli(&["serve", "--metrics-top-tenants", "5"]);
    assert!(!ok);
    assert!(err.contains("needs --metrics-bind"), "{err}");
    // nothing was created
    assert!(!db.schema_exists("tenantry").await);
}

/// Cloning an org copies its data into a new, separate org; a taken slug,
/// an unknown source and a bad slug are the caller's errors.
#[tokio::test]
async fn cloning_an_org_copies_its_data_into_a_separate_org() {
    let app = spawn_app().await;
    let token = app.org_with_token("orig").await;
    let (_, statuses) = app.call(GET, "/v1/orgs/orig/statuses", &token, None).await;
    let (_, behaviors) = app.call(GET, "/v1/orgs/orig/behaviors", &token, None).await;
    let (s, test) = app
        .call(
            POST,
            "/v1/orgs/orig/tests",
            &token,
            Some(json!({"prompt": "tab\there\nand a line", "expected_outcome": "ok",
                "behavior_id": behaviors["items"][0]["id"], "status_id": statuses["items"][0]["id"]})),
        )
        .await;
    assert_eq!(s, 201, "{test}");
    let (s, body) = app
        .call(
            POST,
            "/v1/admin/orgs/orig/clone",
            &app.superuser,
            Some(json!({"new_slug": "twin", "name": "Twin"})),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["organization"]["slug"], "twin");
    assert_eq!(body["organization"]["name"], "Twin");
    let (s, issued) = app
        .call(
            POST,
            "/v1/admin/orgs/twin/tokens",
            &app.superuser,
            Some(json!({"email": "member@twin.test"})),
        )
        .await;
    assert_eq!(s, 201);
    let twin_token = issued["token"]["token"].as_str().unwrap().to_owned();
    let id = test["id"].as_str().unwrap();
    let (s, copied) = app
        .call(GET, &format!("/v1/orgs/twin/tests/{id}"), &twin_token, None)
        .await;
    assert_eq!(s, 200, "{copied}");
    assert_eq!(copied, test);
    // separate: a change to the copy stays in the copy
    let (s, _) = app
        .call(
            DELETE,
            &format!("/v1/orgs/twin/tests/{id}"),
            &twin_token,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = app
        .call(GET, &format!("/v1/orgs/orig/tests/{id}"), &token, None)
        .await;
    assert_eq!(s, 200);
    // and the twin's token cannot see the original
    let (s, _) = app
        .call(GET, "/v1/orgs/orig/tests", &twin_token, None)
        .await;
    assert_eq!(s, 404);
    for (source, body, status, code) in [
        ("orig", json!({"new_slug": "twin"}), 409, "conflict"),
        ("nobody", json!({"new_slug": "other"}), 404, "not_found"),
        (
            "orig",
            json!({"new_slug": "Bad Slug"}),
            422,
            "validation_failed",
        ),
    ] {
        let (s, b) = app
            .call(
                POST,
                &format!("/v1/admin/orgs/{source}/clone"),
                &app.superuser,
                Some(body),
            )
            .await;
        assert_error(s, &b, status, code);
    }
    let (ok, out, err) = app.db.cli(&["orgs", "clone", "orig", "triplet", "--json"]);
    assert!(ok, "{err}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["organization"]["slug"], "triplet");
    assert!(out["rows"].as_u64().unwrap() >= 7);
}

/// `serve --warm-schemas 2`: the server fills the pool, a signup through
/// the API takes a warm schema (and is served at once), and the server
/// refills the pool after it.
#[tokio::test]
async fn a_server_keeps_its_warm_pool_full_and_signups_take_from_it() {
    let app = common::spawn_app_with(tenantry::server::ServerConfig {
        warm_schemas: 2,
        ..Default::default()
    })
    .await;
    let template = tenantry::tenants::template::Template::embedded();
    let ready = || async {
        tenantry::tenants::warm::status(&app.db.pool, &template)
            .await
            .unwrap()
            .ready
    };
    let filled = tokio::time::timeout(Duration::from_secs(60), async {
        while ready().await < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(filled.is_ok(), "the server did not fill its warm pool");
    let warm: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT org_id FROM tenantry.warm_schemas")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();

    let token = app.org_with_token("from-the-pool").await;
    let (s, org) = app
        .call(GET, "/v1/admin/orgs/from-the-pool", &app.superuser, None)
        .await;
    assert_eq!(s, 200, "{org}");
    let id: uuid::Uuid = org["id"].as_str().unwrap().parse().unwrap();
    assert!(warm.contains(&id), "{org}");
    let (s, statuses) = app
        .call(GET, "/v1/orgs/from-the-pool/statuses", &token, None)
        .await;
    assert_eq!(s, 200, "{statuses}");
    assert_eq!(statuses["items"].as_array().unwrap().len(), 3);
    let (text, scrape) = scrape_metrics(&app).await;
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "tenantry_org_creates_total"
                && s.labels.get("schema") == Some("warm")),
        "{text}"
    );

    // refilled after the signup, without waiting for the periodic check
    let refilled = tokio::time::timeout(tenantry::tenants::warm::REFILL_INTERVAL, async {
        while ready().await < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(refilled.is_ok(), "the pool was not refilled after a signup");
}

/// GET /metrics: the text and its parse.
async fn scrape_metrics(app: &common::TestApp) -> (String, prometheus_parse::Scrape) {
    let text = app.metrics().await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    (text, scrape)
}

/// An app embedding tenantry starts it with one call on a database that has
/// never seen tenantry, and its own routes, written as async closures, run
/// in their org's schema under tenantry's request handling, beside
/// tenantry's API.
#[tokio::test]
async fn an_embedding_app_starts_in_one_call_and_its_routes_see_only_their_org() {
    use axum::extract::Query;
    use tenantry::api::error::ApiError;
    use tenantry::api::extract::OrgScope;
    use tenantry::tenants::provision::NewOrg;

    #[derive(serde::Deserialize)]
    struct Probe {
        label: String,
    }
    // what the app's own route sees: its org's schema as the search path
    async fn whoami(org: OrgScope, Query(probe): Query<Probe>) -> Result<String, ApiError> {
        let (schema, label): (String, String) = org
            .read(async move |tx| {
                Ok(tx
                    .query_as("SELECT current_setting('search_path'), $1::text")
                    .bind(probe.label.clone())
                    .fetch_optional()
                    .await?
                    .expect("one row"))
            })
            .await?;
        Ok(format!("{schema} {label}"))
    }

    let db = common::TestDb::empty().await;
    let tenantry = tenantry::Tenantry::connect(&db.url)
        .await
        .expect("tenantry starts on an empty database");
    let orgs = tenantry.tenancy().orgs();
    let mut tokens = vec![];
    for slug in ["emb-a", "emb-b"] {
        let new = NewOrg::parse(slug, slug, Some(&format!("owner@{slug}.test"))).unwrap();
        orgs.create(&new).await.expect("create");
        let (_, token) = orgs
            .issue_org_token(&new.slug, &format!("owner@{slug}.test"), None, None)
            .await
            .expect("token");
        tokens.push(token.token);
    }
    let app = tenantry
        .app(axum::Router::new().route("/v1/orgs/{slug}/whoami", axum::routing::get(whoami)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let get = |path: String, token: &str| {
        http.get(format!("http://{addr}{path}"))
            .bearer_auth(token)
            .send()
    };

    for (slug, token) in ["emb-a", "emb-b"].iter().zip(&tokens) {
        let res = get(format!("/v1/orgs/{slug}/whoami?label=x{slug}"), token)
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        // tenantry's request handling wraps the app's route too
        assert!(res.headers().contains_key("x-request-id"));
        let schema = db.schema_of(slug).await;
        assert_eq!(
            res.text().await.unwrap(),
            format!("{schema}, shared x{slug}")
        );
        // tenantry's own API on the same router
        let res = get(format!("/v1/orgs/{slug}/tests"), token).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    // one org's token cannot reach the other through the app's route
    let res = get("/v1/orgs/emb-b/whoami?label=x".into(), &tokens[0])
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    // an org change through the core reaches the router at once
    orgs.suspend(&tenantry::base::ident::Slug::parse("emb-a").unwrap())
        .await
        .unwrap();
    let res = get("/v1/orgs/emb-a/whoami?label=x".into(), &tokens[0])
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    server.abort();
    tenantry.shutdown().await;
}

/// An org token is authorized before a slug is resolved: probing made-up
/// slugs and another org's costs no registry query, answers exactly like
/// a missing org, and the token's own org follows a rename at once.
#[tokio::test]
async fn org_tokens_probing_other_slugs_cost_no_registry_query() {
    let app = spawn_app().await;
    let token_a = app.org_with_token("probe-a").await;
    app.org_with_token("probe-b").await;
    let (s, body) = app
        .call(GET, "/v1/orgs/probe-a/tests", &token_a, None)
        .await;
    assert_eq!(s, 200, "{body}");
    let router = app.state.tenancy.router();
    let before = router.registry_lookups();

    let (s, missing) = app
        .call(GET, "/v1/orgs/no-such-org/tests", &app.superuser, None)
        .await;
    assert_error(s, &missing, 404, "not_found");
    let after_superuser = router.registry_lookups();
    assert_eq!(
        after_superuser,
        before + 1,
        "a superuser's slug is looked up"
    );

    for i in 0..500 {
        let slug = if i % 50 == 0 {
            "probe-b".to_owned()
        } else {
            format!("made-up-{i}")
        };
        let (s, body) = app
            .call(GET, &format!("/v1/orgs/{slug}/tests"), &token_a, None)
            .await;
        assert_error(s, &body, 404, "not_found");
        // the same answer as an org that does not exist
        assert_eq!(
            body["error"]["message"],
            format!("organization {slug:?} not found"),
            "{body}"
        );
    }
    assert_eq!(
        router.registry_lookups(),
        after_superuser,
        "another org's slugs cost registry lookups"
    );

    // a rename reaches the token's own org at once
    let (s, body) = app
        .call(
            POST,
            "/v1/admin/orgs/probe-a/rename",
            &app.superuser,
            Some(json!({"new_slug": "probe-a2"})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = app
        .call(GET, "/v1/orgs/probe-a2/tests", &token_a, None)
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = app
        .call(GET, "/v1/orgs/probe-a/tests", &token_a, None)
        .await;
    assert_error(s, &body, 404, "not_found");
}

/// Junk requests (made-up methods, random paths, with and without tokens)
/// add no label set to `/metrics`: every method a client makes up is
/// `other`, every path no route matched is `unmatched`.
#[tokio::test]
async fn made_up_methods_and_paths_fold_into_one_label_each() {
    let app = spawn_app().await;
    for i in 0..300 {
        let method = Method::from_bytes(format!("JUNK{i}").as_bytes()).unwrap();
        let path = format!("/junk/{i}/x{}", i * 7919);
        let status = app
            .http
            .request(method, app.url(&path))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_client_error(), "{path}: {status}");
    }
    let (text, scrape) = scrape_metrics(&app).await;
    let standard = [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "other",
    ];
    let mut seen_other = false;
    for sample in scrape
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("tenantry_http_request"))
    {
        let method = sample.labels.get("method").unwrap_or_default();
        assert!(standard.contains(&method), "label method={method:?}");
        let route = sample.labels.get("route").unwrap_or_default();
        assert!(!route.contains("junk"), "label route={route:?}");
        seen_other |= method == "other" && route == "unmatched";
    }
    assert!(seen_other, "{text}");
    assert!(!text.contains("JUNK"), "a made-up method became a label");
}

/// Runs `sql` in a tenant transaction of `slug` and returns its SQLSTATE
/// (None when it succeeded).
async fn sqlstate_in_tenant(
    app: &common::TestApp,
    slug: &str,
    sql: &'static str,
) -> Option<String> {
    let slug = tenantry::base::ident::Slug::parse(slug).unwrap();
    let result = app
        .state
        .tenancy
        .router()
        .with_tenant(&slug, async move |tx| {
            tx.query(sql).execute().await?;
            Ok(())
        })
        .await;
    match result {
        Ok(()) => None,
        Err(tenantry::Error::Database(e)) => tenantry::base::error::sqlstate(&e),
        Err(other) => panic!("{sql}: {other}"),
    }
}

/// Invariant 1 with the shared schema: a tenant transaction reads shared
/// tables by their plain names, may not change them in any way, and still
/// reaches no other tenant; on Citus a join of a tenant table with a shared
/// (reference) table runs on one node. The suite runs directly, through
/// PgBouncer and on Citus.
#[tokio::test]
async fn tenants_read_the_shared_schema_but_never_write_it_or_reach_each_other() {
    let app = spawn_app().await;
    let alpha = app.org_with_token("sh-alpha").await;
    app.org_with_token("sh-beta").await;
    let beta_schema = app.db.schema_of("sh-beta").await;

    let slug = tenantry::base::ident::Slug::parse("sh-alpha").unwrap();
    let (presets, joined): (i64, i64) = app
        .state
        .tenancy
        .router()
        .with_tenant(&slug, async move |tx| {
            Ok(tx
                .query_as(
                    "SELECT (SELECT count(*) FROM catalog_behaviors), \
                            (SELECT count(*) FROM behaviors b JOIN catalog_behaviors c \
                             ON lower(c.name) = lower(b.name))",
                )
                .fetch_one()
                .await?)
        })
        .await
        .unwrap();
    assert_eq!(presets, 3, "the shared template's presets");
    assert_eq!(
        joined, 3,
        "the org started with a copy of each initial preset"
    );

    for sql in [
        "INSERT INTO catalog_behaviors (name) VALUES ('mine')",
        "INSERT INTO shared.catalog_statuses (name) VALUES ('mine')",
        "UPDATE catalog_behaviors SET name = name || '!'",
        "DELETE FROM shared.catalog_statuses",
        "TRUNCATE shared.catalog_behaviors",
        "CREATE TABLE shared.planted (id int)",
        "CREATE VIEW shared.planted AS SELECT 1",
        "ALTER TABLE shared.catalog_behaviors ADD COLUMN planted int",
        "DROP TABLE shared.catalog_behaviors",
        "SELECT * FROM shared.refinery_schema_history",
        "SELECT * FROM tenantry.organizations",
    ] {
        let state = sqlstate_in_tenant(&app, "sh-alpha", sql).await;
        assert_eq!(state.as_deref(), Some("42501"), "{sql} must be refused");
    }
    // the other tenant stays out of reach; its name only reaches SQL through
    // the test's own format, never through tenantry
    let other = Box::leak(format!("SELECT * FROM \"{beta_schema}\".tests").into_boxed_str());
    assert_eq!(
        sqlstate_in_tenant(&app, "sh-alpha", other).await.as_deref(),
        Some("42501")
    );
    // the catalog is intact
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM shared.catalog_behaviors")
            .await,
        3
    );
    assert_eq!(
        app.db
            .count("SELECT count(*) FROM shared.catalog_statuses")
            .await,
        3
    );

    // and through the API, in the org's own transaction
    let (s, body) = app
        .call(GET, "/v1/orgs/sh-alpha/catalog/behaviors", &alpha, None)
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 3);

    if common::citus_run() {
        let plan: Vec<(String,)> = app
            .state
            .tenancy
            .router()
            .with_tenant(&slug, async move |tx| {
                Ok(tx
                    .query_as(
                        "EXPLAIN SELECT b.name, c.description FROM behaviors b \
                         JOIN catalog_behaviors c ON lower(c.name) = lower(b.name)",
                    )
                    .fetch_all()
                    .await?)
            })
            .await
            .unwrap();
        let plan: Vec<String> = plan.into_iter().map(|(l,)| l).collect();
        assert!(
            plan.iter().any(|l| l.trim() == "Task Count: 1"),
            "a join with a reference table runs on the tenant's node alone: {plan:#?}"
        );
        let reference: i64 = app
            .db
            .count(
                "SELECT count(*) FROM pg_dist_partition \
                 WHERE logicalrelid IN ('shared.catalog_behaviors'::regclass, 'shared.catalog_statuses'::regclass) \
                   AND partmethod = 'n' AND repmodel = 't'",
            )
            .await;
        assert_eq!(reference, 2, "the shared tables are reference tables");
    }
}

/// The catalog: superusers manage presets, every org reads them and adopts
/// copies, new orgs start from the initial ones; bad input gets a clear
/// error and changes nothing.
#[tokio::test]
async fn the_catalog_is_managed_by_superusers_read_by_orgs_and_adopted_as_copies() {
    let app = spawn_app().await;
    let alpha = app.org_with_token("cat-alpha").await;
    let beta = app.org_with_token("cat-beta").await;
    let su = app.superuser.clone();

    let (s, preset) = app
        .call(
            POST,
            "/v1/admin/catalog/behaviors",
            &su,
            Some(
                json!({"name": "Fairness", "description": "treats groups alike", "initial": true}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{preset}");
    assert_eq!(preset["initial"], true);
    let id = preset["id"].as_str().unwrap().to_owned();

    // only superusers change it
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/catalog/behaviors",
            &alpha,
            Some(json!({"name": "Mine"})),
        )
        .await;
    assert_error(s, &b, 403, "forbidden");
    let (s, b) = app
        .call(
            DELETE,
            &format!("/v1/admin/catalog/behaviors/{id}"),
            &alpha,
            None,
        )
        .await;
    assert_error(s, &b, 403, "forbidden");

    // bad input
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/catalog/behaviors",
            &su,
            Some(json!({"name": "fairness"})),
        )
        .await;
    assert_error(s, &b, 409, "conflict");
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/catalog/behaviors",
            &su,
            Some(json!({"name": ""})),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/catalog/behaviors",
            &su,
            Some(json!({"name": "X", "colour": 1})),
        )
        .await;
    assert!(s == 400 || s == 422, "{s} {b}");
    let (s, b) = app
        .call(
            POST,
            "/v1/admin/catalog/plans",
            &su,
            Some(json!({"name": "X"})),
        )
        .await;
    assert_error(s, &b, 404, "not_found");
    let (s, b) = app
        .call(GET, "/v1/orgs/cat-alpha/catalog/plans", &alpha, None)
        .await;
    assert_error(s, &b, 404, "not_found");
    let unknown = uuid::Uuid::new_v4();
    let (s, b) = app
        .call(
            PATCH,
            &format!("/v1/admin/catalog/statuses/{unknown}"),
            &su,
            Some(json!({"name": "Y"})),
        )
        .await;
    assert_error(s, &b, 404, "not_found");

    // every org reads it
    for (slug, token) in [("cat-alpha", &alpha), ("cat-beta", &beta)] {
        let (s, body) = app
            .call(
                GET,
                &format!("/v1/orgs/{slug}/catalog/behaviors?limit=2"),
                token,
                None,
            )
            .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["items"].as_array().unwrap().len(), 2);
        let cursor = body["next_cursor"].as_str().unwrap().to_owned();
        let (_, rest) = app
            .call(
                GET,
                &format!("/v1/orgs/{slug}/catalog/behaviors?limit=2&cursor={cursor}"),
                token,
                None,
            )
            .await;
        assert_eq!(rest["items"].as_array().unwrap().len(), 2);
    }

    // adopting makes a copy in that org alone
    let adopt = format!("/v1/orgs/cat-alpha/catalog/behaviors/{id}/adopt");
    let (s, copy) = app.call(POST, &adopt, &alpha, None).await;
    assert_eq!(s, 201, "{copy}");
    assert_eq!(copy["name"], "Fairness");
    assert_eq!(copy["description"], "treats groups alike");
    let (s, b) = app.call(POST, &adopt, &alpha, None).await;
    assert_error(s, &b, 409, "conflict");
    let names = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, own) = app
        .call(GET, "/v1/orgs/cat-alpha/behaviors", &alpha, None)
        .await;
    assert!(names(&own).contains(&"Fairness".to_owned()));
    let (_, own) = app
        .call(GET, "/v1/orgs/cat-beta/behaviors", &beta, None)
        .await;
    assert!(!names(&own).contains(&"Fairness".to_owned()));
    // another org's slug is not found, as everywhere
    let (s, _) = app
        .call(
            POST,
            &format!("/v1/orgs/cat-alpha/catalog/behaviors/{id}/adopt"),
            &beta,
            None,
        )
        .await;
    assert_eq!(s, 404);

    // a new org starts with every initial preset
    let gamma = app.org_with_token("cat-gamma").await;
    let (_, own) = app
        .call(GET, "/v1/orgs/cat-gamma/behaviors", &gamma, None)
        .await;
    assert!(names(&own).contains(&"Fairness".to_owned()), "{own}");

    // changing or removing the preset leaves the copies as they were
    let (s, b) = app
        .call(
            PATCH,
            &format!("/v1/admin/catalog/behaviors/{id}"),
            &su,
            Some(json!({"name": "Equity", "description": null, "initial": false})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["name"], "Equity");
    assert_eq!(b["description"], Value::Null);
    assert_eq!(b["initial"], false);
    let (s, _) = app
        .call(
            DELETE,
            &format!("/v1/admin/catalog/behaviors/{id}"),
            &su,
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, b) = app.call(POST, &adopt, &alpha, None).await;
    assert_error(s, &b, 404, "not_found");
    let (_, own) = app
        .call(GET, "/v1/orgs/cat-alpha/behaviors", &alpha, None)
        .await;
    assert!(names(&own).contains(&"Fairness".to_owned()));
    let (s, b) = app
        .call(GET, "/v1/admin/catalog/behaviors", &su, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["items"].as_array().unwrap().len(), 3);
}
