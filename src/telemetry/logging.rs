//! The process's log: tracing events as text or JSON lines on stderr,
//! written by a thread of its own. A request appends its line to a bounded
//! in-memory buffer and goes on; the writer thread takes the whole buffer
//! every [`FLUSH_EVERY`] (sooner when it is half full) and writes it in one
//! go. So a slow or stalled reader of stderr (a full pipe, a log shipper
//! that hangs) never holds up a request: once the buffer is full, lines are
//! dropped and counted ([`LOG_LINES_DROPPED`] in `/metrics`) instead.
//!
//! Not `tracing-appender`'s non-blocking writer: it wakes its thread for
//! every line, and on two cores shared with PostgreSQL those wake-ups cost
//! more than the write they save (0.82x the requests per second of writing
//! inline, `benches/http/ab.py`); here the thread wakes a hundred times a
//! second whatever the rate.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// Lines dropped because the log buffer was full.
pub const LOG_LINES_DROPPED: &str = "tenantry_log_lines_dropped_total";

/// The buffer's bound by default: seconds of a busy server's request log.
pub const DEFAULT_BUFFER_KIB: usize = 4096;

/// How long a line waits in the buffer at most while stderr keeps up.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);

static INSTALLED: OnceLock<Arc<Shared>> = OnceLock::new();

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    limit: usize,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closed: bool,
}

impl Shared {
    /// A panic elsewhere while holding the lock leaves whole lines behind:
    /// the log goes on.
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.bytes.len() + line.len() > self.limit {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.bytes.extend_from_slice(line);
        let half_full = pending.bytes.len() > self.limit / 2;
        drop(pending);
        if half_full {
            self.wake.notify_one();
        }
    }

    /// The writer thread: every [`FLUSH_EVERY`], or when the buffer is half
    /// full, takes what is pending and writes it; until closed.
    fn write_out(&self, mut out: impl Write) {
        let mut spare = Vec::new();
        loop {
            let mut pending = self.lock();
            if !pending.closed && pending.bytes.len() <= self.limit / 2 {
                pending = self
                    .wake
                    .wait_timeout(pending, FLUSH_EVERY)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let closed = pending.closed;
            std::mem::swap(&mut pending.bytes, &mut spare);
            drop(pending);
            if !spare.is_empty() {
                // nowhere to report a failed write of the log but the log
                let _ = out.write_all(&spare).and_then(|()| out.flush());
                spare.clear();
            }
            if closed {
                return;
            }
        }
    }
}

/// Writes out what is buffered and stops the writer thread when dropped:
/// keep it for the life of the process.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the fmt layer writes each event to: the event arrives whole, in
/// one `write`.
#[derive(Clone)]
struct BufferedStderr(Arc<Shared>);

impl Write for BufferedStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedStderr {
    type Writer = BufferedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs the process's subscriber: `RUST_LOG`, else `default_level`;
/// JSON lines carry the request's span once (`span`), without repeating it
/// in a span list; at most `buffer_kib` KiB wait for stderr. `None` when a
/// subscriber was installed already (an embedding app's, or an earlier
/// call).
pub fn init(default_level: &str, json: bool, buffer_kib: usize) -> Option<LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        limit: buffer_kib.max(1) * 1024,
        dropped: AtomicU64::new(0),
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BufferedStderr(shared.clone()));
    let installed = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            // the current span holds the request's fields already
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
    installed.ok()?;
    let writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name("tenantry-log".into())
        .spawn(move || writer.write_out(std::io::stderr()))
        .expect("spawn the log writer thread");
    let _ = INSTALLED.set(shared.clone());
    Some(LogGuard {
        shared,
        thread: Some(thread),
    })
}

/// Lines dropped so far; `None` when this process's log is not ours.
pub fn dropped_lines() -> Option<u64> {
    INSTALLED.get().map(|s| s.dropped.load(Ordering::Relaxed))
}
