//! Enqueueing a background job in a tenant transaction: the job is a row of
//! the org's own `tenantry_jobs` table, written as the org's role, so it
//! exists if and only if the transaction commits. Running jobs is `jobs`'s.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::base::error::Error;
use crate::serving::router::TenantTx;

/// The most attempts a job may be given.
pub const MAX_ATTEMPTS: i32 = 100;
/// Attempts unless the job says otherwise.
pub const DEFAULT_ATTEMPTS: i32 = 5;
/// Largest payload, as JSON text: a job carries its input (e.g. an import's
/// rows), and PostgreSQL stores it compressed out of line.
pub const PAYLOAD_MAX: usize = 64 * 1024 * 1024;

/// A job to enqueue: its kind (which handler runs it), its payload, and
/// when and how often it may run.
#[derive(Debug, Clone)]
pub struct NewJob {
    kind: String,
    payload: serde_json::Value,
    run_at: Option<OffsetDateTime>,
    unique_key: Option<String>,
    max_attempts: i32,
    schedule: Option<String>,
}

impl NewJob {
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        NewJob {
            kind: kind.into(),
            payload,
            run_at: None,
            unique_key: None,
            max_attempts: DEFAULT_ATTEMPTS,
            schedule: None,
        }
    }

    /// Recurs on the cron schedule `expr` (UTC; 5 fields, or 6 with
    /// seconds first): first at its next occurrence (unless `run_at` says
    /// otherwise), then, each time an occurrence succeeds or is dead, again
    /// at the next occurrence after that. Its unique key (`cron:<kind>`
    /// unless set) keeps one occurrence pending per schedule, so enqueueing
    /// it again changes nothing; cancelling the pending occurrence ends it.
    pub fn cron(mut self, expr: impl Into<String>) -> Self {
        self.schedule = Some(expr.into());
        self
    }

    /// Not before `at` (now when unset).
    pub fn run_at(mut self, at: OffsetDateTime) -> Self {
        self.run_at = Some(at);
        self
    }

    /// While a job of this org with this key is queued or running, another
    /// enqueue with the key is dropped.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Runs at most `n` times (1 to 100; 5 when unset), then is dead.
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    fn check(&mut self) -> Result<String, Error> {
        check_kind(&self.kind)?;
        if let Some(expr) = &self.schedule {
            let next = next_occurrence(expr, OffsetDateTime::now_utc())?;
            self.run_at.get_or_insert(next);
            self.unique_key
                .get_or_insert_with(|| format!("cron:{}", self.kind));
        }
        if let Some(key) = &self.unique_key {
            let n = key.chars().count();
            if !(1..=200).contains(&n) || key.contains('\0') {
                return Err(Error::Validation {
                    field: "unique_key",
                    message: format!("must be 1 to 200 characters without NUL (got {n})"),
                });
            }
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(Error::Validation {
                field: "max_attempts",
                message: format!("must be 1 to {MAX_ATTEMPTS} (got {})", self.max_attempts),
            });
        }
        let payload = self.payload.to_string();
        if payload.len() > PAYLOAD_MAX {
            return Err(Error::Validation {
                field: "payload",
                message: format!("is {} bytes; the most is {PAYLOAD_MAX}", payload.len()),
            });
        }
        // jsonb refuses \u0000, which serde_json writes for a NUL
        if payload.contains("\\u0000") {
            return Err(Error::Validation {
                field: "payload",
                message: "must not contain NUL characters".into(),
            });
        }
        Ok(payload)
    }
}

/// The first occurrence of the cron schedule `expr` (UTC) after `after`.
pub fn next_occurrence(expr: &str, after: OffsetDateTime) -> Result<OffsetDateTime, Error> {
    let invalid = |message: String| Error::Validation {
        field: "schedule",
        message,
    };
    if expr.is_empty() || expr.len() > 100 {
        return Err(invalid(format!(
            "must be 1 to 100 characters (got {})",
            expr.len()
        )));
    }
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| invalid(format!("{expr:?} is not a cron schedule: {e}")))?;
    // whole seconds: cron's resolution (croner would keep the fraction)
    let after = chrono::DateTime::<chrono::Utc>::from_timestamp(after.unix_timestamp(), 0)
        .ok_or_else(|| invalid("the time is out of range".into()))?;
    let next = cron
        .find_next_occurrence(&after, false)
        .map_err(|e| invalid(format!("{expr:?} has no next occurrence: {e}")))?;
    let nanos = next
        .timestamp_nanos_opt()
        .ok_or_else(|| invalid("the next occurrence is out of range".into()))?;
    OffsetDateTime::from_unix_timestamp_nanos(nanos as i128).map_err(|e| invalid(e.to_string()))
}

/// A job kind: 1 to 100 of `a-z 0-9 _ . : -`, starting with a letter.
pub fn check_kind(kind: &str) -> Result<(), Error> {
    let ok = (1..=100).contains(&kind.len())
        && kind.starts_with(|c: char| c.is_ascii_lowercase())
        && kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Validation {
            field: "kind",
            message: format!(
                "{kind:?} must be 1 to 100 of a-z, 0-9, '_', '.', ':' and '-', starting with a letter"
            ),
        })
    }
}

const ENQUEUE: &str =
    "INSERT INTO tenantry_jobs (kind, payload, unique_key, max_attempts, run_at, due_at, schedule) \
     VALUES ($1, $2::jsonb, $3, $4, COALESCE($5, now()), COALESCE($5, now()), $6) \
     ON CONFLICT (unique_key) WHERE state IN ('queued', 'running') DO NOTHING \
     RETURNING id, due_at";

impl TenantTx {
    /// Enqueues `job` in this transaction: it exists if and only if the
    /// transaction commits, and workers learn of it at the commit. Returns
    /// its id, or `None` when a queued or running job has its unique key.
    pub async fn enqueue(&mut self, mut job: NewJob) -> Result<Option<Uuid>, Error> {
        let payload = job.check()?;
        let row: Option<(Uuid, OffsetDateTime)> = self
            .query_as(ENQUEUE)
            .bind(job.kind)
            .bind(payload)
            .bind(job.unique_key)
            .bind(job.max_attempts)
            .bind(job.run_at)
            .bind(job.schedule)
            .fetch_optional()
            .await?;
        Ok(row.map(|(id, due)| {
            self.note_job_due(due);
            id
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_checked() {
        for good in ["tests.import", "a", "send_mail:v2", "x-1"] {
            assert!(check_kind(good).is_ok(), "{good}");
        }
        for bad in ["", "Tests", "1x", "a b", "a;b", &"a".repeat(101)] {
            assert!(check_kind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jobs_are_checked_before_anything_is_sent() {
        let job = |mut j: NewJob| j.check().map(|_| ()).map_err(|e| e.to_string());
        assert!(job(NewJob::new("k", serde_json::json!({"a": 1}))).is_ok());
        assert!(job(NewJob::new("k", serde_json::json!(null)).max_attempts(0)).is_err());
        assert!(job(NewJob::new("k", serde_json::json!(null)).max_attempts(101)).is_err());
        assert!(job(NewJob::new("k", serde_json::json!(null)).unique_key("")).is_err());
        assert!(job(NewJob::new("k", serde_json::json!("a\u{0}b"))).is_err());
        assert!(job(NewJob::new("k", serde_json::json!({})).cron("0 3 * * *")).is_ok());
        assert!(job(NewJob::new("k", serde_json::json!({})).cron("*/5 * * * * *")).is_ok());
        for bad in ["", "61 * * * *", "every day", "* * *"] {
            assert!(
                job(NewJob::new("k", serde_json::json!({})).cron(bad)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_schedule_defaults_its_key_and_first_run() {
        let mut j = NewJob::new("report.weekly", serde_json::json!({})).cron("0 3 * * MON");
        j.check().unwrap();
        assert_eq!(j.unique_key.as_deref(), Some("cron:report.weekly"));
        let at = j.run_at.unwrap();
        assert!(at > OffsetDateTime::now_utc());
        assert_eq!(
            (at.weekday(), at.hour(), at.minute()),
            (time::Weekday::Monday, 3, 0)
        );
        // 2023-11-14 22:13:20 UTC
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let next = next_occurrence("*/10 * * * * *", t).unwrap();
        assert_eq!(next.unix_timestamp(), 1_700_000_010);
    }
}
