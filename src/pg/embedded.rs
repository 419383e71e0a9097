//! Zero-config local PostgreSQL: finds the system's server binaries, creates
//! a cluster in a data directory (as the `postgres` user when we run as root,
//! since PostgreSQL refuses to run as root), starts it on a free loopback
//! port and stops it again. Used by `tenantry serve` without `DATABASE_URL`
//! and by the test harness.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH, under /usr/lib/postgresql/*/bin or in {}: `scripts/serve` installs them (Debian's postgresql package, or a pinned build through npm), or run `apt-get install postgresql`, or set DATABASE_URL", pg_cache_dir().display())]
    BinariesNotFound,
    #[error("running as root but there is no `postgres` user to run PostgreSQL as; create one or set DATABASE_URL")]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How the cluster trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Default PostgreSQL settings: for data you keep.
    Durable,
    /// fsync and synchronous commit off: for throwaway test clusters.
    Throwaway,
}

/// A local PostgreSQL cluster: `<root>/pgdata` plus a generated password in
/// `<root>/password` (the cluster accepts password logins over loopback only).
/// A clone is another handle on the same cluster.
#[derive(Debug, Clone)]
pub struct LocalPostgres {
    root: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    password: String,
    run_as: Option<Owner>,
    started_here: bool,
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

pub const SUPERUSER: &str = "postgres";
/// The login role of the server's tenant connections on a local cluster:
/// not a superuser (see `roles`).
pub const APP_ROLE: &str = "tenantry_app";

impl LocalPostgres {
    /// Creates the cluster under `root` if it does not exist yet, then starts
    /// it unless it is already running (a second `tenantry` process reuses the
    /// running server). Returns a handle; call [`LocalPostgres::stop`] to stop.
    pub fn ensure_running(root: &Path, durability: Durability) -> Result<Self, EmbeddedError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedError::BinariesNotFound)?;
        let run_as = if is_root() {
            Some(postgres_owner()?)
        } else {
            None
        };
        fs::create_dir_all(root).map_err(io_err(root))?;
        let root = root.canonicalize().map_err(io_err(root))?;
        if let Some(owner) = run_as {
            // The server must be able to reach its data and socket directory.
            check_traversable(&root, owner)?;
            chown(&root, owner)?;
        }
        let mut pg = LocalPostgres {
            root,
            bin_dir,
            port: 0,
            password: String::new(),
            run_as,
            started_here: false,
        };
        pg.init_if_needed()?;
        pg.password = fs::read_to_string(pg.password_file())
            .map_err(io_err(&pg.password_file()))?
            .trim()
            .to_owned();
        if let Some(port) = pg.running_port() {
            pg.port = port;
        } else {
            pg.port = free_port()?;
            pg.start(durability)?;
            pg.started_here = true;
        }
        Ok(pg)
    }

    /// A streaming replica of this (running) cluster, number `index`, in
    /// `<root>/replicas/<index>`: made with `pg_basebackup -R` the first
    /// time (without it, from a copy of this cluster stopped for the
    /// purpose), after which it follows this cluster on its own; started on
    /// a port of its own unless it runs already. It shares this cluster's roles and
    /// passwords, which replicate. `apply_delay` holds it behind on purpose
    /// (`recovery_min_apply_delay`, for tests).
    pub fn ensure_replica(
        &self,
        index: u32,
        durability: Durability,
        apply_delay: Option<std::time::Duration>,
    ) -> Result<LocalPostgres, EmbeddedError> {
        let root = self.root.join("replicas").join(index.to_string());
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        for dir in [root.parent().expect("under replicas/"), &root] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
            if let Some(owner) = self.run_as {
                chown(dir, owner)?;
            }
        }
        for file in ["password", "app-password"] {
            let from = self.root.join(file);
            if from.exists() {
                fs::copy(&from, root.join(file)).map_err(io_err(&from))?;
            }
        }
        let mut replica = LocalPostgres {
            root,
            bin_dir: self.bin_dir.clone(),
            port: 0,
            password: self.password.clone(),
            run_as: self.run_as,
            started_here: false,
        };
        let data = replica.data_dir();
        if !data.join("PG_VERSION").exists() {
            // a half-made copy of an earlier attempt
            let _ = fs::remove_dir_all(&data);
            if self.bin_dir.join("pg_basebackup").is_file() {
                let source = format!(
                    "host=127.0.0.1 port={} user={SUPERUSER} dbname=postgres",
                    self.port
                );
                replica.run_env(
                    "pg_basebackup",
                    &[
                        "-D",
                        path_str(&data),
                        "-R",
                        "-X",
                        "stream",
                        "-c",
                        "fast",
                        "-d",
                        &source,
                    ],
                    &[("PGPASSWORD", &self.password)],
                )?;
            } else {
                self.copy_stopped_into(&data, durability)?;
            }
        }
        let auto_conf = data.join("postgresql.auto.conf");
        let conf = fs::read_to_string(&auto_conf).map_err(io_err(&auto_conf))?;
        let mut kept: String = conf
            .lines()
            .filter(|l| !l.starts_with("recovery_min_apply_delay"))
            .map(|l| format!("{l}\n"))
            .collect();
        if let Some(delay) = apply_delay {
            kept.push_str(&format!(
                "recovery_min_apply_delay = '{}ms'\n",
                delay.as_millis()
            ));
        }
        if kept != conf {
            fs::write(&auto_conf, kept).map_err(io_err(&auto_conf))?;
        }
        if let Some(port) = replica.running_port() {
            replica.port = port;
            // the delay may have changed
            replica.run("pg_ctl", &["reload", "-D", path_str(&data)])?;
        } else {
            replica.port = free_port()?;
            replica.start(durability)?;
            replica.started_here = true;
        }
        Ok(replica)
    }

    /// Makes `data` a standby of this cluster without `pg_basebackup`
    /// (server-only builds lack it): stops the cluster, copies its data
    /// directory (consistent, since it was shut down cleanly), starts it
    /// again, and writes what `pg_basebackup -R` writes (`standby.signal`,
    /// `primary_conninfo`). The cluster is down for the copy's length.
    fn copy_stopped_into(&self, data: &Path, durability: Durability) -> Result<(), EmbeddedError> {
        self.stop()?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(self.data_dir())
            .arg(data)
            .output();
        self.start(durability)?;
        let failed = |detail: String| EmbeddedError::Command {
            what: "copying the data directory".into(),
            detail,
        };
        match copied {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(failed(String::from_utf8_lossy(&out.stderr).into_owned())),
            Err(e) => return Err(failed(e.to_string())),
        }
        let signal = data.join("standby.signal");
        fs::write(&signal, "").map_err(io_err(&signal))?;
        if let Some(owner) = self.run_as {
            chown(&signal, owner)?;
        }
        let auto_conf = data.join("postgresql.auto.conf");
        let mut conf = fs::read_to_string(&auto_conf).map_err(io_err(&auto_conf))?;
        conf.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} password={}'\n",
            self.port, self.password
        ));
        fs::write(&auto_conf, conf).map_err(io_err(&auto_conf))?;
        Ok(())
    }

    /// Starts this cluster again after [`LocalPostgres::stop`], on its port.
    pub fn start_again(&self, durability: Durability) -> Result<(), EmbeddedError> {
        self.start(durability)
    }

    /// False when another process had the cluster running already.
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("pgdata")
    }

    fn password_file(&self) -> PathBuf {
        self.root.join("password")
    }

    /// A connection URL for `database` as the cluster's superuser.
    pub fn url(&self, database: &str) -> String {
        self.url_as(SUPERUSER, &self.password, database)
    }

    /// A connection URL for `database` as `user` (hex passwords and plain
    /// role names need no escaping).
    pub fn url_as(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The password of [`APP_ROLE`], made on first use and kept beside the
    /// superuser's (mode 0600).
    pub fn app_password(&self) -> Result<String, EmbeddedError> {
        let file = self.root.join("app-password");
        if let Ok(existing) = fs::read_to_string(&file) {
            return Ok(existing.trim().to_owned());
        }
        let password = crate::base::secret::random_hex(24);
        fs::write(&file, &password).map_err(io_err(&file))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).map_err(io_err(&file))?;
        Ok(password)
    }

    fn init_if_needed(&self) -> Result<(), EmbeddedError> {
        let data = self.data_dir();
        if data.join("PG_VERSION").exists() {
            return Ok(());
        }
        let pw_file = self.password_file();
        let password = crate::base::secret::random_hex(24);
        fs::write(&pw_file, &password).map_err(io_err(&pw_file))?;
        fs::set_permissions(&pw_file, fs::Permissions::from_mode(0o600))
            .map_err(io_err(&pw_file))?;
        // initdb reads the password from a file it can open as the server user.
        let init_pw = self.root.join("initdb-password");
        fs::write(&init_pw, &password).map_err(io_err(&init_pw))?;
        fs::set_permissions(&init_pw, fs::Permissions::from_mode(0o600))
            .map_err(io_err(&init_pw))?;
        if let Some(owner) = self.run_as {
            chown(&init_pw, owner)?;
        }
        let result = self.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                SUPERUSER,
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--pwfile",
                path_str(&init_pw),
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let _ = fs::remove_file(&init_pw);
        result.map(|_| ())
    }

    /// The port of a server already running on this data directory, read from
    /// `postmaster.pid` (line 4), if `pg_ctl status` confirms it is alive.
    fn running_port(&self) -> Option<u16> {
        let data = self.data_dir();
        self.run("pg_ctl", &["status", "-D", path_str(&data)])
            .ok()?;
        let pid_file = fs::read_to_string(data.join("postmaster.pid")).ok()?;
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    fn start(&self, durability: Durability) -> Result<(), EmbeddedError> {
        let data = self.data_dir();
        self.harden()?;
        let mut opts = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c unix_socket_permissions=0700 -c max_connections=200",
            self.port,
            path_str(&self.root)
        );
        if durability == Durability::Throwaway {
            opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
            // Tests and benchmarks count statements with pg_stat_statements
            // where the server has it (PostgreSQL's contrib), in Debian's
            // layout (lib/) or a plain installation's (lib/postgresql/).
            let contrib = ["../lib", "../lib/postgresql"];
            if contrib.iter().any(|dir| {
                self.bin_dir
                    .join(dir)
                    .join("pg_stat_statements.so")
                    .exists()
            }) {
                opts.push_str(" -c shared_preload_libraries=pg_stat_statements");
            }
        }
        let log = self.root.join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &opts,
            ],
        )
        .map_err(|e| match e {
            EmbeddedError::Command { what, detail } => EmbeddedError::Command {
                what,
                detail: format!(
                    "{detail}\n--- {} ---\n{}",
                    log.display(),
                    fs::read_to_string(&log).unwrap_or_default()
                ),
            },
            other => other,
        })?;
        Ok(())
    }

    /// Only the server's user may reach the socket directory, and every
    /// login needs a password: clusters made by earlier versions trusted
    /// local (socket) connections, which are switched to scram here.
    fn harden(&self) -> Result<(), EmbeddedError> {
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.root))?;
        let hba = self.data_dir().join("pg_hba.conf");
        let text = fs::read_to_string(&hba).map_err(io_err(&hba))?;
        let hardened: String = text
            .lines()
            .map(|line| {
                let rule = line.split_whitespace().collect::<Vec<_>>();
                if !line.trim_start().starts_with('#') && rule.last() == Some(&"trust") {
                    format!(
                        "{}scram-sha-256\n",
                        line.trim_end().strip_suffix("trust").unwrap_or(line)
                    )
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        if hardened != text {
            fs::write(&hba, hardened).map_err(io_err(&hba))?;
        }
        Ok(())
    }

    /// Stops the server and starts it again on the same port (for fault
    /// tests: clients see every connection drop, then the server return).
    pub fn restart(&self, durability: Durability) -> Result<(), EmbeddedError> {
        self.stop()?;
        self.start(durability)
    }

    /// Stops the server (fast shutdown: active sessions are rolled back).
    pub fn stop(&self) -> Result<(), EmbeddedError> {
        self.run(
            "pg_ctl",
            &["stop", "-w", "-m", "fast", "-D", path_str(&self.data_dir())],
        )
        .map(|_| ())
    }

    /// Starts a detached watchdog that stops the cluster (and its replicas)
    /// and deletes `root` once process `pid` has exited. Test binaries have no global teardown
    /// hook, so this is how their throwaway cluster gets removed afterwards,
    /// even when the tests panic or are killed.
    pub fn remove_when_process_exits(&self, pid: u32) -> Result<(), EmbeddedError> {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let stop = self.wrap_command(&pg_ctl);
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
             for d in '{root}'/replicas/*/pgdata; do [ -d \"$d\" ] && {stop} stop -m immediate -D \"$d\" >/dev/null 2>&1; done; \
             {stop} stop -m immediate -D '{data}' >/dev/null 2>&1; rm -rf '{root}'",
            stop = stop.join(" "),
            data = path_str(&self.data_dir()),
            root = path_str(&self.root),
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| EmbeddedError::Command {
                what: "watchdog".into(),
                detail: e.to_string(),
            })?;
        Ok(())
    }

    fn wrap_command(&self, program: &Path) -> Vec<String> {
        match self.run_as {
            Some(_) => vec![
                "runuser".into(),
                "-u".into(),
                SUPERUSER.into(),
                "--".into(),
                path_str(program).into(),
            ],
            None => vec![path_str(program).into()],
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String, EmbeddedError> {
        self.run_env(program, args, &[])
    }

    /// Runs `program` with `env` set (runuser keeps the environment).
    fn run_env(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<String, EmbeddedError> {
        let argv = self.wrap_command(&self.bin_dir.join(program));
        let output = Command::new(&argv[0])
            .args(&argv[1..])
            .args(args)
            .envs(env.iter().copied())
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| EmbeddedError::Command {
                what: program.into(),
                detail: e.to_string(),
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(EmbeddedError::Command {
                what: format!("{program} {}", args.join(" ")),
                detail: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            })
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("tenantry data paths are UTF-8")
}

/// The directory holding `initdb` and `pg_ctl`: PATH first, then the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout, not on PATH), then
/// the newest build `scripts/serve` fetched into [`pg_cache_dir`].
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // PATH often holds symlinks (e.g. /usr/local/bin/initdb ->
                // /usr/lib/postgresql/15/bin/initdb); the real directory is
                // where the server's own binaries and libraries are found.
                let real = fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                return Some(real.unwrap_or(dir));
            }
        }
    }
    newest_version_bin(Path::new("/usr/lib/postgresql"))
        .or_else(|| newest_version_bin(&pg_cache_dir()))
}

/// `<dir>/<major>/bin` of the highest major version that has `initdb`.
fn newest_version_bin(dir: &Path) -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Where `scripts/serve` and `scripts/install-postgres-versions` keep the
/// PostgreSQL builds they fetch: `TENANTRY_PG_CACHE`; as root
/// `/var/cache/tenantry/postgres` (the `postgres` user runs them);
/// otherwise `$XDG_CACHE_HOME/tenantry/postgres` or
/// `~/.cache/tenantry/postgres`.
pub fn pg_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TENANTRY_PG_CACHE") {
        return PathBuf::from(dir);
    }
    if is_root() {
        return PathBuf::from("/var/cache/tenantry/postgres");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("tenantry").join("postgres")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_owner() -> Result<Owner, EmbeddedError> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, SUPERUSER]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Ok(Owner {
        uid: id("-u").ok_or(EmbeddedError::NoPostgresUser)?,
        gid: id("-g").ok_or(EmbeddedError::NoPostgresUser)?,
    })
}

/// Every directory above `dir` must let the `postgres` user pass through,
/// or initdb fails with a confusing "permission denied".
fn check_traversable(dir: &Path, owner: Owner) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors().skip(1) {
        let meta = fs::metadata(ancestor).map_err(io_err(ancestor))?;
        let mode = meta.mode();
        let passable = if meta.uid() == owner.uid {
            mode & 0o100 != 0
        } else if meta.gid() == owner.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !passable {
            return Err(EmbeddedError::Command {
                what: "preparing the data directory".into(),
                detail: format!(
                    "PostgreSQL runs as user '{SUPERUSER}', which cannot enter {} (mode {:o}); \
                     choose a --data-dir outside it (e.g. /var/lib/tenantry) or set DATABASE_URL",
                    ancestor.display(),
                    mode & 0o7777
                ),
            });
        }
    }
    Ok(())
}

fn chown(path: &Path, owner: Owner) -> Result<(), EmbeddedError> {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid)).map_err(io_err(path))
}

fn free_port() -> Result<u16, EmbeddedError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err(Path::new("127.0.0.1:0")))?;
    let port = listener
        .local_addr()
        .map_err(io_err(Path::new("127.0.0.1:0")))?
        .port();
    Ok(port)
}
