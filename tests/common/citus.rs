//! A throwaway Citus cluster for the test suite's Citus run: a coordinator
//! and two workers, three data directories on free loopback ports
//! (`shared_preload_libraries = 'citus'`, `wal_level = logical`, fsync off,
//! trust authentication on loopback only, sockets in a private directory).
//! Each test database is created on every node with the extension, and the
//! workers are added to the coordinator's metadata of that database.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sqlx::{Connection, PgConnection};

use super::pgbouncer::{free_port, is_root, when_this_process_exits};

pub struct CitusCluster {
    root: PathBuf,
    pub coordinator: u16,
    pub workers: Vec<u16>,
}

/// Whether the Citus extension is installed for the server binaries.
pub fn installed() -> bool {
    let Some(bin) = tenantry::pg::embedded::find_bin_dir() else {
        return false;
    };
    let Ok(out) = Command::new(bin.join("pg_config"))
        .arg("--pkglibdir")
        .output()
    else {
        // pg_config may live elsewhere; look next to the binaries
        return bin.join("../lib/citus.so").exists();
    };
    let lib = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Path::new(&lib).join("citus.so").exists() || bin.join("../lib/citus.so").exists()
}

/// Runs a PostgreSQL binary, as `postgres` when we are root.
fn run(bin: &Path, program: &str, args: &[&str]) {
    let path = bin.join(program);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    let out = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl CitusCluster {
    pub fn start() -> CitusCluster {
        let bin = tenantry::pg::embedded::find_bin_dir().expect("PostgreSQL binaries");
        let root = tempfile::Builder::new()
            .prefix("tenantry-test-citus-")
            .tempdir()
            .expect("temp dir")
            .keep();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root)
                .status()
                .expect("chown");
            assert!(status.success());
        }
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        for (i, port) in ports.iter().enumerate() {
            let data = root.join(format!("node{i}"));
            let data = data.to_str().unwrap();
            run(
                &bin,
                "initdb",
                &[
                    "-D",
                    data,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            );
            let opts = format!(
                "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
                 -c shared_preload_libraries=citus -c wal_level=logical -c max_connections=1000 \
                 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
                 -c max_worker_processes=32",
                root.display()
            );
            let log = root.join(format!("node{i}.log"));
            run(
                &bin,
                "pg_ctl",
                &[
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    data,
                    "-l",
                    log.to_str().unwrap(),
                    "-o",
                    &opts,
                ],
            );
        }
        // stopped and removed when this process exits
        let stops: Vec<String> = (0..3)
            .map(|i| {
                let pg_ctl = bin.join("pg_ctl");
                let data = root.join(format!("node{i}"));
                if is_root() {
                    format!(
                        "runuser -u postgres -- {} stop -m immediate -D '{}' >/dev/null 2>&1",
                        pg_ctl.display(),
                        data.display()
                    )
                } else {
                    format!(
                        "{} stop -m immediate -D '{}' >/dev/null 2>&1",
                        pg_ctl.display(),
                        data.display()
                    )
                }
            })
            .collect();
        when_this_process_exits(&format!(
            "{}; rm -rf '{}'",
            stops.join("; "),
            root.display()
        ));
        CitusCluster {
            root,
            coordinator: ports[0],
            workers: ports[1..].to_vec(),
        }
    }

    /// The last lines of every node's log, for failures of the cluster.
    fn log_tails(&self) -> String {
        (0..3)
            .map(|i| {
                let log = self.root.join(format!("node{i}.log"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                format!("--- {} ---\n{tail}", log.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn url(&self, port: u16, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{database}")
    }

    /// The coordinator's maintenance database.
    pub fn coordinator_url(&self) -> String {
        self.url(self.coordinator, "postgres")
    }

    /// Creates `name` on every node, with the Citus extension, and adds the
    /// workers to the coordinator's metadata of it. One database at a time:
    /// `CREATE EXTENSION citus` and `citus_add_node` update objects shared
    /// by all databases of a node (its configuration, the roles), and two
    /// at once fail with "tuple concurrently updated".
    pub async fn create_database(&self, name: &str) {
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _serial = ONE_AT_A_TIME.lock().await;
        for port in self.workers.iter().chain([&self.coordinator]) {
            let mut conn = PgConnection::connect(&self.url(*port, "postgres"))
                .await
                .expect("connect to a Citus node");
            sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .expect("create database on a node");
            conn.close().await.ok();
            let mut conn = PgConnection::connect(&self.url(*port, name))
                .await
                .expect("connect to the new database");
            sqlx::raw_sql("CREATE EXTENSION citus")
                .execute(&mut conn)
                .await
                .expect("CREATE EXTENSION citus");
            if *port == self.coordinator {
                sqlx::query("SELECT citus_set_coordinator_host('127.0.0.1', $1)")
                    .bind(i32::from(self.coordinator))
                    .execute(&mut conn)
                    .await
                    .expect("citus_set_coordinator_host");
                for worker in &self.workers {
                    sqlx::query("SELECT citus_add_node('127.0.0.1', $1)")
                        .bind(i32::from(*worker))
                        .execute(&mut conn)
                        .await
                        .unwrap_or_else(|e| panic!("citus_add_node: {e}\n{}", self.log_tails()));
                }
            }
            conn.close().await.ok();
        }
    }
}
