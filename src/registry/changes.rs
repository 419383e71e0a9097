//! Registry changes that caches must hear of, and their announcement:
//! every change that affects routing or authentication is written in one
//! transaction together with a NOTIFY on [`REGISTRY_CHANNEL`], so every
//! process that listens hears of it when (and only if) it commits.

use sqlx::PgConnection;

use crate::base::ident::Slug;

/// NOTIFY channel of registry changes (payloads: see [`Change`]).
pub const REGISTRY_CHANNEL: &str = "tenantry_registry";

/// A registry change that caches must hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Routing of this slug changed: created, suspended, resumed, renamed
    /// (old and new slug), deleted.
    Org(Slug),
    /// The token with this SHA-256 digest was revoked.
    TokenRevoked([u8; 32]),
    /// Anything may have changed (e.g. notifications were lost).
    Everything,
}

impl Change {
    /// `org:<slug>`, `token:<64 hex>` or `*`.
    pub fn payload(&self) -> String {
        match self {
            Change::Org(slug) => format!("org:{slug}"),
            Change::TokenRevoked(hash) => format!("token:{}", crate::base::secret::hex(hash)),
            Change::Everything => "*".to_owned(),
        }
    }

    /// Reads a payload; anything not understood (including payloads of a
    /// newer version) means [`Change::Everything`], the safe reading. A bare
    /// slug is what earlier versions sent for an org.
    pub fn parse(payload: &str) -> Change {
        if let Some(slug) = payload.strip_prefix("org:") {
            return Slug::parse(slug).map_or(Change::Everything, Change::Org);
        }
        if let Some(hex) = payload.strip_prefix("token:") {
            return parse_digest(hex).map_or(Change::Everything, Change::TokenRevoked);
        }
        Slug::parse(payload).map_or(Change::Everything, Change::Org)
    }
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Announces `change` inside the caller's transaction: listeners hear of it
/// when (and only if) the transaction commits.
pub async fn announce(conn: &mut PgConnection, change: &Change) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(REGISTRY_CHANNEL)
        .bind(change.payload())
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_unknown_ones_mean_everything() {
        let slug = Slug::parse("acme-corp").unwrap();
        for change in [
            Change::Org(slug.clone()),
            Change::TokenRevoked([0xab; 32]),
            Change::Everything,
        ] {
            assert_eq!(Change::parse(&change.payload()), change);
        }
        assert_eq!(Change::parse("acme-corp"), Change::Org(slug));
        for odd in [
            "",
            "org:",
            "org:Bad Slug",
            "token:zz",
            "token:abc",
            "v9:whatever",
        ] {
            assert_eq!(Change::parse(odd), Change::Everything, "{odd:?}");
        }
    }
}
