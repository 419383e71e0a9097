//! A real PgBouncer in transaction pooling mode in front of a PostgreSQL
//! server, for the test suite's pooler run and the benchmarks. Started once
//! per process on a free port, with fewer server connections than a
//! tenantry client pool, and stopped by a watchdog when the process exits.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Server connections per database and user: fewer than a server's tenant
/// pool (16), so that client connections really share sessions.
pub const POOL_SIZE: u32 = 3;

pub struct PgBouncer {
    pub port: u16,
    pub dir: PathBuf,
    admin_url: String,
}

fn pgbouncer_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/bin",
    ]) {
        let candidate = Path::new(dir).join("pgbouncer");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("pgbouncer is not installed: run scripts/install-postgres (it installs it with apt-get)")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the shell `cleanup` once this (test or benchmark) process has
/// exited, from a detached watchdog.
pub fn when_this_process_exits(cleanup: &str) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.2; done; {cleanup}",
        me = std::process::id(),
    );
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start a watchdog");
    assert!(status.success(), "cannot start a watchdog");
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl PgBouncer {
    /// Starts PgBouncer in front of `server_url` (a PostgreSQL URL whose
    /// user and password PgBouncer logs in with), `pool_mode = transaction`,
    /// every database of that server reachable by name, with `pool_size`
    /// server connections per database and user.
    pub fn start(server_url: &str, pool_size: u32) -> PgBouncer {
        let url = url::Url::parse(server_url).expect("a database URL");
        let (host, pg_port) = (
            url.host_str().unwrap_or("127.0.0.1").to_owned(),
            url.port().unwrap_or(5432),
        );
        let user = url.username().to_owned();
        let password = percent_encoding::percent_decode_str(url.password().unwrap_or(""))
            .decode_utf8_lossy()
            .into_owned();
        let dir = tempfile::Builder::new()
            .prefix("tenantry-test-pgbouncer-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let port = free_port();
        let config = format!(
            "[databases]\n\
             * = host={host} port={pg_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {dir}/userlist.txt\n\
             admin_users = {user}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 2000\n\
             ignore_startup_parameters = extra_float_digits\n\
             pidfile = {dir}/pgbouncer.pid\n\
             logfile = {dir}/pgbouncer.log\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), config).expect("write pgbouncer.ini");
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"{user}\" \"{}\"\n", password.replace('"', "\"\"")),
        )
        .expect("write userlist.txt");
        let binary = pgbouncer_binary();
        let ini = dir.join("pgbouncer.ini");
        // PgBouncer refuses to run as root.
        let mut command = if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(
                status.success(),
                "cannot give {} to postgres",
                dir.display()
            );
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        // -d: it forks once listening and the command returns
        let status = command
            .arg("-d")
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        assert!(
            status.success(),
            "pgbouncer did not start; see {}/pgbouncer.log",
            dir.display()
        );
        // stopped (and its directory removed) when this process exits
        when_this_process_exits(&format!(
            "kill $(cat '{dir}/pgbouncer.pid') 2>/dev/null; sleep 0.5; rm -rf '{dir}'",
            dir = dir.display(),
        ));
        // ready when it accepts connections
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not start; see {}/pgbouncer.log",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        PgBouncer {
            port,
            dir,
            admin_url: format!("{}", {
                let mut admin = url.clone();
                admin.set_host(Some("127.0.0.1")).unwrap();
                admin.set_port(Some(port)).unwrap();
                admin.set_path("/pgbouncer");
                admin
            }),
        }
    }

    /// Client and server connections PgBouncer has for `database`, from its
    /// admin console.
    pub async fn sessions(&self, database: &str) -> (usize, usize) {
        use sqlx::{Connection, Row};
        let mut console = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("pgbouncer admin console");
        let count = |rows: Vec<sqlx::postgres::PgRow>| {
            rows.iter()
                .filter(|r| r.try_get::<String, _>("database").ok().as_deref() == Some(database))
                .count()
        };
        let clients = sqlx::raw_sql("SHOW CLIENTS")
            .fetch_all(&mut console)
            .await
            .expect("SHOW CLIENTS");
        let clients = count(clients);
        let servers = sqlx::raw_sql("SHOW SERVERS")
            .fetch_all(&mut console)
            .await
            .expect("SHOW SERVERS");
        (clients, count(servers))
    }

    /// `url` (of the server behind it) with host and port of this PgBouncer.
    pub fn url_for(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).expect("a database URL");
        parsed.set_host(Some("127.0.0.1")).unwrap();
        parsed.set_port(Some(self.port)).unwrap();
        parsed.to_string()
    }
}
