//! One tenant as a self-describing archive: `tenantry orgs export` and
//! `tenantry orgs import`. Not `pg_dump`: only the tenant's rows, read with
//! `COPY` in one `REPEATABLE READ` read-only transaction (a consistent
//! snapshot while the tenant keeps serving), streamed so memory stays flat
//! whatever the tenant's size.
//!
//! Format, all of it bytes on one stream:
//!
//! ```text
//! tenantry-archive <2 | 1>\n
//! {header: JSON on one line}\n
//! <rows of the first table, exactly `bytes` long>
//! <rows of the next table> ...
//! end\n
//! ```
//!
//! Format 2 (the default) holds each table's rows as one COPY binary
//! stream, format 1 in COPY text format ([`RowFormat`]); import reads both.
//!
//! The header names the format, the tenantry version, the template version
//! of the tenant, the org's slug and name, and per table (in an order where
//! referenced tables come first) its columns, row count, byte count and
//! SHA-256 of its rows. The exporter reads each table twice in the same
//! snapshot (once for the header's counts and checksums, once to write),
//! in storage order from the first block both times, and refuses to finish
//! if the two reads differ.
//!
//! Import creates a new org from an archive in one transaction: registry
//! row, role, schema and template at the archive's version, the rows
//! through `COPY FROM STDIN` with their counts and checksums verified, then
//! the template's later migrations. The rows go into bare tables: the
//! keys, indexes and foreign keys are dropped first and built again after
//! the load, each in one pass (as `pg_restore` does), so rows that break
//! one still fail the import. Any mismatch (truncated, corrupted,
//! tampered, unknown format or version) fails with a clear error and leaves
//! nothing behind. `created_by`/`updated_by` ids are kept as they are (the
//! users of the old org are not copied; the ids keep saying who wrote what).
//! The org's jobs (`tenantry_jobs`) are not data: an archive leaves them out.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::base::error::Error;
use crate::base::ident::{quote_ident, SchemaName, Slug};
use crate::pg::engine::Engine;
use crate::tenants::jobs::JOBS_TABLE;
use crate::tenants::provision::{Created, NewOrg};
use crate::tenants::template::{Template, HISTORY_TABLE};

/// Tables of a tenant schema that an archive leaves out: the migration
/// history (the archive records the version) and the org's jobs (work
/// pending in one place is not data to copy: a clone would run it again).
const NOT_DATA: [&str; 2] = [HISTORY_TABLE, JOBS_TABLE];

pub const MAGIC: &str = "tenantry-archive";
/// Format 1: rows in COPY text format. Format 2: rows in COPY binary format.
pub const FORMATS: [u32; 2] = [1, 2];

/// How an archive's rows are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowFormat {
    /// COPY binary format (archive format 2): about twice as fast to write
    /// and to load, and smaller; PostgreSQL's binary representation of
    /// each type, which the same or a later PostgreSQL reads.
    #[default]
    Binary,
    /// COPY text format (archive format 1): readable, and portable to any
    /// PostgreSQL version.
    Text,
}

impl RowFormat {
    /// The archive format number of archives with rows in this format.
    pub fn number(self) -> u32 {
        match self {
            RowFormat::Text => 1,
            RowFormat::Binary => 2,
        }
    }

    fn of(format: u32) -> Option<RowFormat> {
        match format {
            1 => Some(RowFormat::Text),
            2 => Some(RowFormat::Binary),
            _ => None,
        }
    }

    /// The COPY option of this format.
    fn copy_option(self) -> &'static str {
        match self {
            RowFormat::Text => "",
            RowFormat::Binary => " (FORMAT binary)",
        }
    }
}
/// The longest header line an import accepts.
const MAX_HEADER: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format: u32,
    pub tenantry: String,
    pub template_version: i32,
    /// The shared schema's version when the org was exported: an import
    /// needs at least this one. The shared data itself is never archived.
    /// 0 in archives of releases before the shared schema.
    #[serde(default)]
    pub shared_version: i32,
    pub org: ArchivedOrg,
    pub tables: Vec<ArchivedTable>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchivedOrg {
    pub slug: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchivedTable {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

fn bad(message: impl Into<String>) -> Error {
    Error::Validation {
        field: "archive",
        message: message.into(),
    }
}

/// A table as the archive reads it.
struct Table {
    name: String,
    columns: Vec<String>,
}

/// Name, columns and referenced tables, per table.
type CatalogRow = (String, Vec<String>, Vec<String>);

/// The tenant's tables (not the migration history), referenced tables
/// first.
async fn tables(conn: &mut PgConnection, schema: &SchemaName) -> Result<Vec<Table>, Error> {
    let rows: Vec<CatalogRow> = sqlx::query_as(
        "SELECT c.relname::text, \
           ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
                 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum), \
           ARRAY(SELECT DISTINCT r.relname::text FROM pg_constraint f JOIN pg_class r ON r.oid = f.confrelid \
                 WHERE f.conrelid = c.oid AND f.contype = 'f' AND r.relnamespace = c.relnamespace AND r.oid <> c.oid) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname <> ALL($2) ORDER BY c.relname",
    )
    .bind(schema.as_str())
    .bind(&NOT_DATA[..])
    .fetch_all(conn)
    .await?;
    // referenced tables first (Kahn's algorithm, by name for stability)
    let mut left = rows;
    let mut ordered: Vec<Table> = vec![];
    while !left.is_empty() {
        let placed: Vec<&str> = ordered.iter().map(|t| t.name.as_str()).collect();
        let Some(i) = left
            .iter()
            .position(|(_, _, refs)| refs.iter().all(|r| placed.contains(&r.as_str())))
        else {
            return Err(Error::Internal(format!(
                "the foreign keys of schema {schema} form a cycle; it cannot be exported table by table"
            )));
        };
        let (name, columns, _) = left.remove(i);
        ordered.push(Table { name, columns });
    }
    Ok(ordered)
}

/// A plain `COPY` of the table: a sequential scan in storage order, which
/// in one snapshot, with `synchronize_seqscans` off (a scan of a large
/// table could otherwise start where another scan is), gives the same rows
/// in the same order each time. Faster than `COPY (SELECT ... ORDER BY)`
/// by half; the export checks that both reads were the same anyway.
fn copy_out_sql(schema: &SchemaName, table: &str, columns: &[String], format: RowFormat) -> String {
    let columns: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!(
        "COPY {}.{} ({}) TO STDOUT{}",
        schema.quoted(),
        quote_ident(table),
        columns.join(", "),
        format.copy_option()
    )
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    pub header: Header,
    /// Bytes written, header included.
    pub bytes: u64,
}

/// Writes org `slug` as an archive to `out`, rows in binary format.
pub async fn export(
    pool: &PgPool,
    slug: &Slug,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<Exported, Error> {
    export_as(pool, slug, RowFormat::Binary, out).await
}

/// Writes org `slug` as an archive to `out`, rows in `format`.
#[tracing::instrument(skip(pool, out))]
pub async fn export_as(
    pool: &PgPool,
    slug: &Slug,
    format: RowFormat,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<Exported, Error> {
    let mut tx = OwnTx::begin(pool, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
    // both passes read each table from its first block (see
    // copy_out_sql); on Citus, on the worker that holds the tenant too
    if Engine::detect(&mut tx).await?.is_citus() {
        sqlx::Executor::execute(&mut *tx, "SET LOCAL citus.propagate_set_commands = 'local'")
            .await?;
    }
    sqlx::Executor::execute(&mut *tx, "SET LOCAL synchronize_seqscans = off").await?;
    let org = crate::registry::get_org(&mut tx, slug).await?;
    let shared_version = crate::tenants::shared::version(&mut tx).await?;
    let schema = org.schema_name.clone();
    let tables = tables(&mut tx, &schema).await?;
    // pass 1: counts and checksums
    let mut archived = vec![];
    for Table { name, columns } in &tables {
        let sql = copy_out_sql(&schema, name, columns, format);
        let (mut hash, mut bytes, mut rows) = (Sha256::new(), 0u64, RowCounter::new(format));
        let mut stream = tx.copy_out_raw(&sql).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hash.update(&chunk);
            bytes += chunk.len() as u64;
            rows.feed(&chunk)
                .map_err(|e| Error::Internal(format!("table {name}: {e}")))?;
        }
        drop(stream);
        let rows = rows
            .finish()
            .map_err(|e| Error::Internal(format!("table {name}: {e}")))?;
        archived.push(ArchivedTable {
            name: name.clone(),
            columns: columns.clone(),
            rows,
            bytes,
            sha256: hex(&hash.finalize()),
        });
    }
    let header = Header {
        format: format.number(),
        tenantry: env!("CARGO_PKG_VERSION").to_owned(),
        template_version: org.template_version,
        shared_version,
        org: ArchivedOrg {
            slug: org.slug.to_string(),
            name: org.name.clone(),
        },
        tables: archived,
    };
    let head = format!(
        "{MAGIC} {}\n{}\n",
        format.number(),
        serde_json::to_string(&header).map_err(|e| Error::Internal(e.to_string()))?
    );
    let io = |e: std::io::Error| Error::Internal(format!("cannot write the archive: {e}"));
    // COPY yields a message per row: batch them into large writes (a
    // tokio file or stdout costs a thread hop per write)
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, out);
    out.write_all(head.as_bytes()).await.map_err(io)?;
    let mut written = head.len() as u64;
    // pass 2: the rows, the same bytes in the same snapshot
    for (t, table) in tables.iter().zip(&header.tables) {
        let (name, columns) = (&t.name, &t.columns);
        let sql = copy_out_sql(&schema, name, columns, format);
        let (mut hash, mut bytes) = (Sha256::new(), 0u64);
        let mut stream = tx.copy_out_raw(&sql).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hash.update(&chunk);
            bytes += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(io)?;
        }
        drop(stream);
        if bytes != table.bytes || hex(&hash.finalize()) != table.sha256 {
            return Err(Error::Internal(format!(
                "table {name} read differently twice in one snapshot; nothing usable was written"
            )));
        }
        written += bytes;
    }
    out.write_all(b"end\n").await.map_err(io)?;
    out.flush().await.map_err(io)?;
    tx.commit().await?;
    Ok(Exported {
        header,
        bytes: written + 4,
    })
}

/// Counts the rows of a COPY stream fed in chunks of any size: lines in
/// text format; in binary format, tuples, parsed from the format's
/// framing (signature, flags, header extension; per tuple a field count,
/// then each field's length and bytes; a trailer of -1).
struct RowCounter {
    format: RowFormat,
    rows: u64,
    /// Binary: bytes of an unfinished integer (or of the header).
    carry: Vec<u8>,
    /// Binary: bytes of field data (or of the header extension) to pass.
    skip: u64,
    phase: Phase,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Tuple,
    /// Fields of the current tuple still to read.
    Fields(u16),
    End,
}

/// `PGCOPY\n\377\r\n\0`, then 32-bit flags and header extension length.
const BINARY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

impl RowCounter {
    fn new(format: RowFormat) -> Self {
        RowCounter {
            format,
            rows: 0,
            carry: Vec::with_capacity(19),
            skip: 0,
            phase: Phase::Header,
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        if self.format == RowFormat::Text {
            self.rows += data.iter().filter(|b| **b == b'\n').count() as u64;
            return Ok(());
        }
        loop {
            if self.skip > 0 {
                let n = self.skip.min(data.len() as u64);
                data = &data[n as usize..];
                self.skip -= n;
            }
            if data.is_empty() {
                return Ok(());
            }
            let need = match self.phase {
                Phase::Header => 19,
                Phase::Tuple => 2,
                Phase::Fields(_) => 4,
                Phase::End => return Err("binary COPY data after its trailer".into()),
            };
            let n = (need - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.carry.len() < need {
                return Ok(());
            }
            let word = std::mem::take(&mut self.carry);
            match self.phase {
                Phase::Header => {
                    if &word[..11] != BINARY_SIGNATURE {
                        return Err("not binary COPY data".into());
                    }
                    self.skip = u32::from_be_bytes([word[15], word[16], word[17], word[18]]).into();
                    self.phase = Phase::Tuple;
                }
                Phase::Tuple => match i16::from_be_bytes([word[0], word[1]]) {
                    -1 => self.phase = Phase::End,
                    n if n < 0 => return Err(format!("bad binary COPY field count {n}")),
                    n => {
                        self.rows += 1;
                        if n > 0 {
                            self.phase = Phase::Fields(n as u16);
                        }
                    }
                },
                Phase::Fields(left) => {
                    let len = i32::from_be_bytes([word[0], word[1], word[2], word[3]]);
                    if len > 0 {
                        self.skip = len as u64;
                    }
                    self.phase = if left == 1 {
                        Phase::Tuple
                    } else {
                        Phase::Fields(left - 1)
                    };
                }
                Phase::End => unreachable!("returned above"),
            }
            self.carry = word;
            self.carry.clear();
        }
    }

    /// The rows counted; for binary data, only once its trailer was read.
    fn finish(&self) -> Result<u64, String> {
        match self.format {
            RowFormat::Text => Ok(self.rows),
            RowFormat::Binary if self.phase == Phase::End && self.skip == 0 => Ok(self.rows),
            RowFormat::Binary => Err("binary COPY data ends without its trailer".into()),
        }
    }
}

/// A transaction on a connection of its own that is closed, not given
/// back to the pool, unless the transaction commits: an export or import
/// abandoned in the middle of a COPY (the client went away, a bad archive)
/// leaves its connection mid-protocol.
struct OwnTx(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl OwnTx {
    async fn begin(pool: &PgPool, begin: &str) -> Result<Self, Error> {
        let mut conn = pool.acquire().await?;
        sqlx::Executor::execute(&mut *conn, begin).await?;
        Ok(OwnTx(Some(conn)))
    }

    async fn commit(mut self) -> Result<(), Error> {
        let mut conn = self.0.take().expect("committed once");
        match sqlx::Executor::execute(&mut *conn, "COMMIT").await {
            Ok(_) => Ok(()),
            Err(e) => {
                conn.close_on_drop();
                Err(e.into())
            }
        }
    }
}

impl std::ops::Deref for OwnTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.0.as_ref().expect("open")
    }
}

impl std::ops::DerefMut for OwnTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0.as_mut().expect("open")
    }
}

impl Drop for OwnTx {
    fn drop(&mut self) {
        if let Some(mut conn) = self.0.take() {
            conn.close_on_drop();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an import made.
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    #[serde(flatten)]
    pub created: Created,
    /// The archive's template version; the org was then migrated to the
    /// current one.
    pub from_template_version: i32,
    pub rows: u64,
}

/// Reads the magic line and the header.
pub async fn read_header(input: &mut (impl AsyncBufReadExt + Unpin)) -> Result<Header, Error> {
    let mut line = Vec::new();
    let io = |e: std::io::Error| bad(format!("cannot read the archive: {e}"));
    (&mut *input)
        .take(64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(io)?;
    let magic = String::from_utf8_lossy(&line);
    let Some(version) = magic
        .trim_end()
        .strip_prefix(&format!("{MAGIC} "))
        .map(str::to_owned)
    else {
        return Err(bad(
            "not a tenantry archive (no \"tenantry-archive\" first line)",
        ));
    };
    if !FORMATS.iter().any(|f| f.to_string() == version) {
        return Err(bad(format!(
            "archive format {version:?} is not supported (this tenantry reads formats {FORMATS:?})"
        )));
    }
    line.clear();
    (&mut *input)
        .take(MAX_HEADER as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(io)?;
    if line.last() != Some(&b'\n') {
        return Err(bad("the archive's header is truncated or too long"));
    }
    let header: Header = serde_json::from_slice(&line)
        .map_err(|e| bad(format!("the archive's header is not valid: {e}")))?;
    if header.format.to_string() != version {
        return Err(bad(format!(
            "the archive's first line says format {version}, its header {}",
            header.format
        )));
    }
    Ok(header)
}

/// Creates org `slug` (named `name`, or as the archived org was) from the
/// archive on `input`, in one transaction.
#[tracing::instrument(skip(pool, template, input))]
pub async fn import(
    pool: &PgPool,
    template: &Template,
    slug: &Slug,
    name: Option<&str>,
    input: impl AsyncRead + Unpin,
) -> Result<Imported, Error> {
    let mut input = BufReader::with_capacity(64 * 1024, input);
    let header = read_header(&mut input).await?;
    let row_format = RowFormat::of(header.format).expect("read_header checked the format");
    let new = &NewOrg::parse(slug.as_str(), name.unwrap_or(&header.org.name), None)?;
    let latest = template.latest_version();
    let at_version = template
        .up_to(header.template_version)
        .filter(|_| header.template_version <= latest)
        .filter(|t| t.latest_version() == header.template_version)
        .ok_or_else(|| {
            bad(format!(
                "the archive is at template version {}, which this template (versions up to {latest}) does not have",
                header.template_version
            ))
        })?;
    let mut tx = OwnTx::begin(pool, "BEGIN").await?;
    let shared_version = crate::tenants::shared::version(&mut tx).await?;
    if header.shared_version > shared_version {
        return Err(bad(format!(
            "the archive was exported with shared schema version {}, and this database's is at {shared_version}: run `tenantry migrate` first",
            header.shared_version
        )));
    }
    let engine = Engine::detect(&mut tx).await?;
    let created =
        crate::tenants::provision::create_org_in(&mut tx, &at_version, new, None, false).await?;
    let schema = created.organization.schema_name.clone();
    let expected: Vec<String> = tables(&mut tx, &schema)
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    let mut archived: Vec<String> = header.tables.iter().map(|t| t.name.clone()).collect();
    archived.sort();
    let mut sorted = expected.clone();
    sorted.sort();
    if archived != sorted {
        return Err(bad(format!(
            "the archive's tables {archived:?} are not those of template version {} ({sorted:?})",
            header.template_version
        )));
    }
    // Rows load fastest into bare tables: keys, indexes and foreign keys
    // come back after the load, each built or checked in one pass (as
    // pg_restore does), in this transaction. On Citus they stay (each DDL
    // there is a distributed operation).
    let deferred = if engine.is_citus() {
        Deferred::default()
    } else {
        Deferred::read(&mut tx, &schema).await?
    };
    if !deferred.drop.is_empty() {
        crate::pg::statements::simple_query(&mut tx, &deferred.drop.join("; ")).await?;
    }
    let mut rows = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for table in &header.tables {
        let columns = table
            .columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY {}.{} ({columns}) FROM STDIN{}",
                schema.quoted(),
                quote_ident(&table.name),
                row_format.copy_option()
            ))
            .await
            .map_err(|e| bad(format!("table {}: {e}", table.name)))?;
        let (mut hash, mut left) = (Sha256::new(), table.bytes);
        while left > 0 {
            let want = buf.len().min(left as usize);
            let n = input
                .read(&mut buf[..want])
                .await
                .map_err(|e| bad(format!("cannot read the archive: {e}")))?;
            if n == 0 {
                let _ = copy.abort("truncated archive").await;
                return Err(bad(format!(
                    "the archive is truncated: table {} ends {left} bytes early",
                    table.name
                )));
            }
            hash.update(&buf[..n]);
            if let Err(e) = copy.send(&buf[..n]).await {
                return Err(bad(format!("table {}: {e}", table.name)));
            }
            left -= n as u64;
        }
        if hex(&hash.finalize()) != table.sha256 {
            let _ = copy.abort("checksum mismatch").await;
            return Err(bad(format!(
                "table {}: the rows do not match the archive's checksum (corrupted or altered)",
                table.name
            )));
        }
        let stored = copy
            .finish()
            .await
            .map_err(|e| bad(format!("table {}: {e}", table.name)))?;
        if stored != table.rows {
            return Err(bad(format!(
                "table {}: {stored} rows stored, the header says {}",
                table.name, table.rows
            )));
        }
        rows += stored;
    }
    let mut trailer = Vec::new();
    (&mut input)
        .take(8)
        .read_to_end(&mut trailer)
        .await
        .map_err(|e| bad(format!("cannot read the archive: {e}")))?;
    if trailer != b"end\n" {
        return Err(bad(
            "the archive does not end where its header says (truncated or with extra data)",
        ));
    }
    if !deferred.create.is_empty() {
        crate::pg::statements::simple_query(&mut tx, &deferred.create.join("; "))
            .await
            .map_err(|e| {
                bad(format!(
                    "the archive's rows break a key or foreign key of the template: {}",
                    crate::base::error::chain(&e)
                ))
            })?;
    }
    // then the template's later migrations, and the registry's version
    if header.template_version < latest {
        template
            .apply(&mut tx, &schema, None, false)
            .await
            .map_err(Error::Template)?;
        if engine.is_citus() {
            let role = crate::base::ident::RoleName::for_org(&created.organization.id);
            crate::pg::statements::hand_over_schema(&mut tx, &schema, &role, true).await?;
        }
    }
    sqlx::Executor::execute(&mut *tx, "RESET ROLE").await?;
    sqlx::query(
        "UPDATE tenantry.organizations SET template_version = $2, updated_at = now() WHERE id = $1",
    )
    .bind(created.organization.id)
    .bind(latest)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut created = created;
    created.organization.template_version = latest;
    tracing::info!(slug = %new.slug, rows, "organization imported");
    Ok(Imported {
        created,
        from_template_version: header.template_version,
        rows,
    })
}

/// The keys, unique constraints, indexes and foreign keys of a schema's
/// tables (the migration history aside), as the statements that drop them
/// and those that build them again as they were.
#[derive(Default)]
struct Deferred {
    drop: Vec<String>,
    create: Vec<String>,
}

impl Deferred {
    async fn read(conn: &mut PgConnection, schema: &SchemaName) -> Result<Self, Error> {
        // (rank, kind, table, name, definition), in the order they can be
        // dropped: foreign keys first, then the indexes and keys they need
        let items: Vec<(i32, String, String, String, String)> = sqlx::query_as(
            "SELECT CASE c.contype WHEN 'f' THEN 0 ELSE 2 END, 'constraint', t.relname::text, \
                    c.conname::text, pg_get_constraintdef(c.oid) \
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
             JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE n.nspname = $1 AND t.relname <> ALL($2) AND c.contype IN ('f', 'p', 'u') \
             UNION ALL \
             SELECT 1, 'index', t.relname::text, i.relname::text, pg_get_indexdef(i.oid) \
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
             JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE n.nspname = $1 AND t.relname <> ALL($2) \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid \
                               AND c.conrelid = x.indrelid AND c.contype IN ('p', 'u', 'x')) \
             ORDER BY 1, 3, 4",
        )
        .bind(schema.as_str())
        .bind(&NOT_DATA[..])
        .fetch_all(&mut *conn)
        .await?;
        let mut deferred = Deferred::default();
        for (_, kind, table, name, definition) in items {
            let (table, name) = (
                format!("{}.{}", schema.quoted(), quote_ident(&table)),
                quote_ident(&name),
            );
            if kind == "index" {
                deferred
                    .drop
                    .push(format!("DROP INDEX {}.{name}", schema.quoted()));
                deferred.create.push(definition);
            } else {
                deferred
                    .drop
                    .push(format!("ALTER TABLE {table} DROP CONSTRAINT {name}"));
                deferred.create.push(format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {name} {definition}"
                ));
            }
        }
        // built again in the reverse order: keys and indexes, then the
        // foreign keys that need them
        deferred.create.reverse();
        Ok(deferred)
    }
}

/// Copies org `source` into a new org `slug` (named `name`, or as the
/// source): the export streamed straight into the import, in this
/// process, no file in between. The source keeps serving; the copy is one
/// snapshot of it.
#[tracing::instrument(skip(pool, template))]
pub async fn clone_org(
    pool: &PgPool,
    template: &Template,
    source: &Slug,
    slug: &Slug,
    name: Option<&str>,
) -> Result<Imported, Error> {
    let (mut writer, reader) = tokio::io::duplex(256 * 1024);
    let exporting = async move {
        let exported = export(pool, source, &mut writer).await;
        // the import sees the end of the stream either way
        drop(writer);
        exported
    };
    let (exported, imported) = tokio::join!(exporting, import(pool, template, slug, name, reader));
    match (exported, imported) {
        (Ok(_), imported) => imported,
        // the export failed first (e.g. no such org): the import only saw
        // the stream end early
        (
            Err(e),
            Err(Error::Validation {
                field: "archive", ..
            }),
        ) => Err(e),
        // the import failed first (e.g. the slug is taken), which broke
        // the export's stream
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary COPY data: two tuples (one with a text field and a NULL, one
    /// with no fields) and a 3-byte header extension.
    fn binary_copy() -> Vec<u8> {
        let mut d = BINARY_SIGNATURE.to_vec();
        d.extend(0u32.to_be_bytes());
        d.extend(3u32.to_be_bytes());
        d.extend(b"ext");
        d.extend(2i16.to_be_bytes());
        d.extend(3i32.to_be_bytes());
        d.extend(b"abc");
        d.extend((-1i32).to_be_bytes());
        d.extend(0i16.to_be_bytes());
        d.extend((-1i16).to_be_bytes());
        d
    }

    #[test]
    fn binary_rows_are_counted_whatever_the_chunks() {
        let data = binary_copy();
        for chunk in 1..=data.len() {
            let mut counter = RowCounter::new(RowFormat::Binary);
            for piece in data.chunks(chunk) {
                counter.feed(piece).unwrap();
            }
            assert_eq!(counter.finish(), Ok(2), "chunks of {chunk}");
        }
    }

    #[test]
    fn broken_binary_rows_are_refused() {
        let data = binary_copy();
        for cut in 0..data.len() {
            let mut counter = RowCounter::new(RowFormat::Binary);
            counter.feed(&data[..cut]).unwrap();
            assert!(counter.finish().is_err(), "cut at {cut}");
        }
        let mut counter = RowCounter::new(RowFormat::Binary);
        assert!(
            counter.feed(b"1\tabc\n2\tdefghijklmnop\n").is_err(),
            "text is not binary"
        );
        let mut counter = RowCounter::new(RowFormat::Binary);
        assert!(counter.feed(&[data.clone(), vec![0]].concat()).is_err());
    }

    #[test]
    fn text_rows_are_lines() {
        let mut counter = RowCounter::new(RowFormat::Text);
        counter.feed(b"1\ta\n2\t").unwrap();
        counter.feed(b"b\n").unwrap();
        assert_eq!(counter.finish(), Ok(2));
    }
}
