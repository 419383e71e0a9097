//! Signup latency, cold (the schema built in the signup's transaction)
//! against warm (taken from the warm pool, which a refill task keeps at
//! `--warm` schemas, as `serve --warm-schemas` does), in one run on one
//! database of `--tenants` orgs. Warm signups come one every
//! `--interval-ms`, a signup rate the refill keeps up with; the pool's
//! lowest level during the run is printed, and any signup that found it
//! empty counts as a miss.
//!
//!     cargo bench --bench signup -- --tenants 1000 --creates 1000 --cold 200 --warm 50 --interval-ms 25

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{arg, bench_pool, ms, Stats};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 1000);
    let creates: usize = arg("--creates", 1000);
    let cold: usize = arg("--cold", 200);
    let warm: usize = arg("--warm", 50);
    let interval = Duration::from_millis(arg("--interval-ms", 25));
    let (pool, _) = bench_pool(4).await;
    tenantry::tenants::migrate_database(&pool).await.unwrap();
    let template = Arc::new(Template::embedded());
    let started = Instant::now();
    for i in 0..tenants {
        provision::create_org(
            &pool,
            &template,
            &NewOrg::parse(&format!("other-{i:05}"), "Other", None).unwrap(),
        )
        .await
        .unwrap();
    }
    println!(
        "{tenants} tenants made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let signup = |slug: String| {
        let (pool, template) = (pool.clone(), template.clone());
        async move {
            let new = NewOrg::parse(&slug, "Signup", Some(&format!("owner@{slug}.test"))).unwrap();
            let t = Instant::now();
            let created = provision::create_org(&pool, &template, &new).await.unwrap();
            (t.elapsed(), created.from_warm_pool)
        }
    };

    // cold: no warm pool, at the same pace
    let mut cold_lat = vec![];
    for i in 0..cold {
        let (d, from_pool) = signup(format!("cold-{i:05}")).await;
        assert!(!from_pool);
        cold_lat.push(d);
        tokio::time::sleep(interval).await;
    }

    // warm: fill, then sign up while the refill task keeps the pool full
    let filled = Instant::now();
    tenantry::tenants::warm::fill(&pool, &template, warm)
        .await
        .unwrap();
    let fill_s = filled.elapsed().as_secs_f64();
    let poke = Arc::new(tokio::sync::Notify::new());
    let refill =
        tenantry::tenants::warm::spawn_refill(pool.clone(), template.clone(), warm, poke.clone());
    let (mut warm_lat, mut misses, mut lowest) = (vec![], 0, warm as i64);
    for i in 0..creates {
        let (d, from_pool) = signup(format!("warm-{i:05}")).await;
        poke.notify_one();
        warm_lat.push(d);
        misses += usize::from(!from_pool);
        tokio::time::sleep(interval).await;
        let level = tenantry::tenants::warm::status(&pool, &template)
            .await
            .unwrap()
            .ready;
        lowest = lowest.min(level);
    }
    refill.abort();

    let (c, w) = (Stats::of(cold_lat), Stats::of(warm_lat));
    println!(
        "warm pool of {warm} filled in {fill_s:.2} s ({:.1} ms per schema); lowest level during the run: {lowest}",
        fill_s * 1000.0 / warm.max(1) as f64
    );
    println!("| signup | n | p50 ms | p95 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for (name, s) in [("cold (schema built)", &c), ("warm pool", &w)] {
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            s.n,
            ms(s.median),
            ms(s.p95),
            ms(s.p99)
        );
    }
    println!(
        "warm signups that found the pool empty: {misses}; warm p50 is {:.1}x faster, p99 {:.1}x",
        ms(c.median) / ms(w.median),
        ms(c.p99) / ms(w.p99)
    );
}
