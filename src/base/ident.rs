//! Identifiers that end up in SQL text: organization slugs and tenant schema
//! names. Both are parse-don't-validate newtypes; the only way to put one into
//! SQL is [`quote_ident`] (via [`SchemaName::quoted`]), so invariant 3 of the
//! design ("every identifier that reaches SQL text was parsed and is quoted")
//! is enforced by the types rather than by review.

use std::fmt;

/// Longest slug accepted: long enough for any company name, short enough for
/// URLs and listings. (Slugs never reach SQL text: schema and role names are
/// derived from the org's id, see [`SchemaName::for_org`].)
pub const SLUG_MAX_LEN: usize = 48;
pub const SLUG_MIN_LEN: usize = 2;
/// PostgreSQL truncates identifiers longer than this silently; we refuse them.
pub const IDENT_MAX_BYTES: usize = 63;
/// Every tenant schema starts with this prefix, so tenant schemas can be told
/// apart from everything else in the database (doctor relies on it).
pub const TENANT_SCHEMA_PREFIX: &str = "t_";

/// The schema of data every org reads (`tenants::shared`): a tenant
/// transaction searches it after the tenant's own schema.
pub const SHARED_SCHEMA: &str = "shared";

/// Slugs that would be confusing or dangerous as org names: they collide with
/// routes, PostgreSQL's own schemas or our registry.
const RESERVED_SLUGS: &[&str] = &[
    "admin",
    "api",
    "information-schema",
    "public",
    "root",
    "system",
    "tenantry",
    "www",
];

/// Why a string is not a valid slug. Each variant is one rule, checked in the
/// order listed, so a caller always learns the first rule the input breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlugError {
    #[error("slug must be at least {SLUG_MIN_LEN} characters long")]
    TooShort,
    #[error("slug must be at most {SLUG_MAX_LEN} characters long (got {0})")]
    TooLong(usize),
    #[error("slug must start with a lowercase letter a-z")]
    BadStart,
    #[error(
        "slug may only contain lowercase letters a-z, digits and '-' (found {0:?} at position {1})"
    )]
    BadChar(char, usize),
    #[error("slug must not end with '-'")]
    TrailingHyphen,
    #[error("slug must not contain '--'")]
    DoubleHyphen,
    #[error("slug {0:?} is reserved")]
    Reserved(String),
}

/// An organization's URL-safe name: `^[a-z][a-z0-9-]{1,47}$`, no trailing or
/// doubled hyphen, not reserved, not starting with `pg-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Slug(String);

impl Slug {
    pub fn parse(input: &str) -> Result<Self, SlugError> {
        let len = input.chars().count();
        if len < SLUG_MIN_LEN {
            return Err(SlugError::TooShort);
        }
        if len > SLUG_MAX_LEN {
            return Err(SlugError::TooLong(len));
        }
        let first = input.chars().next().expect("length checked above");
        if !first.is_ascii_lowercase() {
            return Err(SlugError::BadStart);
        }
        if let Some((pos, c)) = input
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(SlugError::BadChar(c, pos));
        }
        if input.ends_with('-') {
            return Err(SlugError::TrailingHyphen);
        }
        if input.contains("--") {
            return Err(SlugError::DoubleHyphen);
        }
        if RESERVED_SLUGS.contains(&input) || input.starts_with("pg-") {
            return Err(SlugError::Reserved(input.to_owned()));
        }
        Ok(Slug(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Slug {
    type Err = SlugError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Slug::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Slug {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Slug::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaNameError {
    #[error("schema name must not be empty")]
    Empty,
    #[error("schema name must be at most {IDENT_MAX_BYTES} bytes (got {0})")]
    TooLong(usize),
    #[error("schema name may only contain a-z, 0-9 and '_' (found {0:?} at position {1})")]
    BadChar(char, usize),
    #[error("schema name {0:?} is reserved by PostgreSQL or tenantry")]
    Reserved(String),
    #[error("tenant schema names must start with {TENANT_SCHEMA_PREFIX:?}")]
    MissingPrefix,
}

/// A tenant's PostgreSQL schema: `t_` followed by `[a-z0-9_]`, at most 63
/// bytes, never `public`, `pg_*`, `information_schema` or `tenantry`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct SchemaName(String);

impl SchemaName {
    /// The search path of a tenant transaction in this schema (invariant
    /// 1): this schema, then the shared one, quoted, for `SET LOCAL
    /// search_path TO ...`.
    pub fn tenant_search_path(&self) -> String {
        format!("{}, {}", self.quoted(), quote_ident(SHARED_SCHEMA))
    }

    pub fn parse(input: &str) -> Result<Self, SchemaNameError> {
        if input.is_empty() {
            return Err(SchemaNameError::Empty);
        }
        if input.len() > IDENT_MAX_BYTES {
            return Err(SchemaNameError::TooLong(input.len()));
        }
        if let Some((pos, c)) = input
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
        {
            return Err(SchemaNameError::BadChar(c, pos));
        }
        if matches!(input, "public" | "information_schema" | "tenantry") || input.starts_with("pg_")
        {
            return Err(SchemaNameError::Reserved(input.to_owned()));
        }
        if !input.starts_with(TENANT_SCHEMA_PREFIX) || input.len() == TENANT_SCHEMA_PREFIX.len() {
            return Err(SchemaNameError::MissingPrefix);
        }
        Ok(SchemaName(input.to_owned()))
    }

    /// The schema (and PostgreSQL role) of the org with this id: `t_` + the
    /// id's 32 hex digits. Derived from the id, never from the slug: a slug
    /// can be renamed and reused by a new org, an id cannot, so a schema
    /// belongs to one org for its whole life and no stale slug -> schema
    /// mapping anywhere can route one org's request into another org's data
    /// (invariant 8, `docs/invariants.md`). Also unique across databases of one cluster,
    /// which roles need (they are cluster-wide).
    pub fn for_org(id: &uuid::Uuid) -> Self {
        let name = format!("{TENANT_SCHEMA_PREFIX}{}", id.simple());
        SchemaName::parse(&name).expect("every uuid maps to a valid schema name")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The schema as a double-quoted SQL identifier, ready to paste into SQL.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a string cannot name a PostgreSQL role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleNameError {
    #[error("role name must be 1 to {IDENT_MAX_BYTES} bytes (got {0})")]
    Length(usize),
    #[error("role name must not contain NUL or control characters")]
    BadChar,
    #[error("role name {0:?} is reserved by PostgreSQL")]
    Reserved(String),
}

/// A PostgreSQL role: a tenant's (`t_` + org id hex, like its schema) or a
/// serving role named by configuration. Always quoted in SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct RoleName(String);

impl RoleName {
    /// A role named in configuration (e.g. the user of a connection URL).
    pub fn parse(input: &str) -> Result<Self, RoleNameError> {
        if input.is_empty() || input.len() > IDENT_MAX_BYTES {
            return Err(RoleNameError::Length(input.len()));
        }
        if input.chars().any(char::is_control) {
            return Err(RoleNameError::BadChar);
        }
        if input.starts_with("pg_")
            || matches!(
                input,
                "public" | "current_user" | "session_user" | "current_role" | "none"
            )
        {
            return Err(RoleNameError::Reserved(input.to_owned()));
        }
        Ok(RoleName(input.to_owned()))
    }

    /// The role of the org with this id: the same name as the schema the org
    /// gets at creation (see [`SchemaName::for_org`]); unique across the
    /// cluster, as roles must be.
    pub fn for_org(id: &uuid::Uuid) -> Self {
        RoleName(SchemaName::for_org(id).0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quotes any string as a PostgreSQL identifier: wraps it in double quotes
/// and doubles embedded quotes. This is the one quoting function of the crate.
/// NUL bytes cannot be sent to PostgreSQL at all, so they are dropped.
pub fn quote_ident(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 2);
    out.push('"');
    for c in raw.chars() {
        match c {
            '"' => out.push_str("\"\""),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads one double-quoted identifier the way PostgreSQL's lexer does and
    /// returns (identifier, bytes consumed). Independent of `quote_ident`.
    fn lex_quoted_ident(sql: &str) -> Option<(String, usize)> {
        let bytes: Vec<char> = sql.chars().collect();
        if bytes.first() != Some(&'"') {
            return None;
        }
        let mut ident = String::new();
        let mut i = 1;
        let mut consumed = 1;
        while i < bytes.len() {
            let c = bytes[i];
            consumed += c.len_utf8();
            if c == '"' {
                if bytes.get(i + 1) == Some(&'"') {
                    ident.push('"');
                    consumed += 1;
                    i += 2;
                    continue;
                }
                return Some((ident, consumed));
            }
            ident.push(c);
            i += 1;
        }
        None
    }

    /// The rules of `Slug::parse`, restated independently (deliberately not
    /// with the same helpers), returning the first one that `s` breaks.
    #[allow(clippy::manual_is_ascii_check)]
    fn expected_slug_error(s: &str) -> Option<SlugError> {
        let chars: Vec<char> = s.chars().collect();
        if chars.len() < 2 {
            return Some(SlugError::TooShort);
        }
        if chars.len() > 48 {
            return Some(SlugError::TooLong(chars.len()));
        }
        if !('a'..='z').contains(&chars[0]) {
            return Some(SlugError::BadStart);
        }
        for (i, c) in chars.iter().enumerate() {
            if !(('a'..='z').contains(c) || ('0'..='9').contains(c) || *c == '-') {
                return Some(SlugError::BadChar(*c, i));
            }
        }
        if chars[chars.len() - 1] == '-' {
            return Some(SlugError::TrailingHyphen);
        }
        if s.contains("--") {
            return Some(SlugError::DoubleHyphen);
        }
        if RESERVED_SLUGS.contains(&s) || s.starts_with("pg-") {
            return Some(SlugError::Reserved(s.to_string()));
        }
        None
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        // The tail is SQL that follows the identifier; it never starts with a
        // quote, which PostgreSQL would read as part of the identifier.
        fn quoting_never_lets_input_escape(raw in any::<String>(), tail in "([ ;a-z')(-][ ;a-z\"')(-]{0,7})?") {
            let quoted = quote_ident(&raw);
            let sql = format!("{quoted}{tail}");
            let (ident, consumed) = lex_quoted_ident(&sql).expect("quoted identifier must be closed");
            prop_assert_eq!(consumed, quoted.len(), "the identifier must end exactly where quoting ends");
            prop_assert_eq!(ident, raw.replace('\0', ""));
        }

        #[test]
        fn slug_parse_agrees_with_rules(s in "[a-z0-9\\-_A-Z\"; .é]{0,52}") {
            match (Slug::parse(&s), expected_slug_error(&s)) {
                (Ok(slug), None) => {
                    prop_assert_eq!(slug.as_str(), s.as_str());
                }
                (Err(got), Some(want)) => prop_assert_eq!(got, want),
                (got, want) => prop_assert!(false, "parse gave {:?}, rules say {:?}", got, want),
            }
        }

        #[test]
        fn valid_slugs_are_accepted(s in "[a-z][a-z0-9]{0,10}(-[a-z0-9]{1,10}){0,3}") {
            prop_assume!(s.len() >= 2 && !s.starts_with("pg-") && !RESERVED_SLUGS.contains(&s.as_str()));
            prop_assert!(Slug::parse(&s).is_ok());
        }

        #[test]
        fn distinct_orgs_get_distinct_safe_schemas(a in any::<u128>(), b in any::<u128>()) {
            let (ia, ib) = (uuid::Uuid::from_u128(a), uuid::Uuid::from_u128(b));
            let (sa, sb) = (SchemaName::for_org(&ia), SchemaName::for_org(&ib));
            prop_assert_eq!(ia == ib, sa == sb);
            prop_assert!(sa.as_str().len() <= IDENT_MAX_BYTES);
            prop_assert!(sa.as_str().chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            prop_assert_eq!(sa.quoted(), format!("\"{}\"", sa.as_str()));
        }

        #[test]
        fn schema_names_only_admit_safe_characters(s in any::<String>()) {
            if let Ok(name) = SchemaName::parse(&s) {
                prop_assert!(name.as_str().starts_with("t_"));
                prop_assert!(name.as_str().len() <= IDENT_MAX_BYTES);
                prop_assert!(!name.as_str().contains('"'));
            }
        }
    }

    #[test]
    fn slug_rejections_name_the_rule() {
        assert_eq!(Slug::parse("a"), Err(SlugError::TooShort));
        assert_eq!(Slug::parse(&"a".repeat(49)), Err(SlugError::TooLong(49)));
        assert_eq!(Slug::parse("1acme"), Err(SlugError::BadStart));
        assert_eq!(Slug::parse("Acme"), Err(SlugError::BadStart));
        assert_eq!(Slug::parse("ac\"me"), Err(SlugError::BadChar('"', 2)));
        assert_eq!(Slug::parse("acme_corp"), Err(SlugError::BadChar('_', 4)));
        assert_eq!(Slug::parse("acme;drop"), Err(SlugError::BadChar(';', 4)));
        assert_eq!(Slug::parse("acme-"), Err(SlugError::TrailingHyphen));
        assert_eq!(Slug::parse("ac--me"), Err(SlugError::DoubleHyphen));
        assert!(matches!(Slug::parse("admin"), Err(SlugError::Reserved(_))));
        assert!(matches!(
            Slug::parse("tenantry"),
            Err(SlugError::Reserved(_))
        ));
        assert!(matches!(Slug::parse("public"), Err(SlugError::Reserved(_))));
        assert!(matches!(
            Slug::parse("pg-catalog"),
            Err(SlugError::Reserved(_))
        ));
        assert_eq!(Slug::parse("acme-corp-2").unwrap().as_str(), "acme-corp-2");
    }

    #[test]
    fn schema_name_rules() {
        assert_eq!(
            SchemaName::for_org(&"3fa85f64-5717-4562-b3fc-2c963f66afa6".parse().unwrap()).as_str(),
            "t_3fa85f6457174562b3fc2c963f66afa6"
        );
        assert_eq!(SchemaName::parse(""), Err(SchemaNameError::Empty));
        assert!(matches!(
            SchemaName::parse("public"),
            Err(SchemaNameError::Reserved(_))
        ));
        assert!(matches!(
            SchemaName::parse("pg_catalog"),
            Err(SchemaNameError::Reserved(_))
        ));
        assert!(matches!(
            SchemaName::parse("information_schema"),
            Err(SchemaNameError::Reserved(_))
        ));
        assert!(matches!(
            SchemaName::parse("tenantry"),
            Err(SchemaNameError::Reserved(_))
        ));
        assert_eq!(
            SchemaName::parse("acme"),
            Err(SchemaNameError::MissingPrefix)
        );
        assert_eq!(SchemaName::parse("t_"), Err(SchemaNameError::MissingPrefix));
        assert_eq!(
            SchemaName::parse("t_a\"b"),
            Err(SchemaNameError::BadChar('"', 3))
        );
        assert_eq!(
            SchemaName::parse(&format!("t_{}", "a".repeat(62))),
            Err(SchemaNameError::TooLong(64))
        );
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
