//! The tenancy core: the one place where registry changes that affect
//! routing or authentication are made and announced.
//!
//! Every such change (org created, suspended, resumed, renamed, deleted;
//! token revoked) is written by `provision` in one transaction together with
//! a NOTIFY on [`REGISTRY_CHANNEL`], so every process that listens hears of
//! it when it commits, the CLI's changes included. [`Tenancy`] is what a
//! server holds: it makes the change, applies it to its own caches at once
//! (invariant 6, `docs/invariants.md`) and runs the listener that applies other processes'
//! changes. The HTTP layer and the CLI stay thin on top of it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::auth::Authenticator;
use crate::error::Error;
use crate::ident::Slug;
use crate::provision::{self, Created, NewOrg};
use crate::registry::{IssuedToken, Organization, User};
use crate::router::TenantRouter;
use crate::template::Template;

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
            Change::TokenRevoked(hash) => format!("token:{}", crate::secret::hex(hash)),
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
pub(crate) async fn announce(conn: &mut PgConnection, change: &Change) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(REGISTRY_CHANNEL)
        .bind(change.payload())
        .execute(conn)
        .await?;
    Ok(())
}

/// A server's view of the tenancy: the registry (through the admin pool),
/// the router and the authenticator, kept coherent with every change.
#[derive(Clone)]
pub struct Tenancy {
    admin: PgPool,
    router: TenantRouter,
    auth: Authenticator,
    template: Arc<Template>,
    listening: Arc<tokio::sync::watch::Sender<bool>>,
    /// Told of every org created here, for the warm pool's refill task.
    created: Arc<tokio::sync::Notify>,
}

impl Tenancy {
    pub fn new(
        admin: PgPool,
        router: TenantRouter,
        auth: Authenticator,
        template: Arc<Template>,
    ) -> Self {
        Tenancy {
            admin,
            router,
            auth,
            template,
            listening: Arc::new(tokio::sync::watch::channel(false).0),
            created: Arc::new(tokio::sync::Notify::new()),
        }
    }

    pub fn router(&self) -> &TenantRouter {
        &self.router
    }

    pub fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// The pool of the admin role: registry writes, provisioning.
    pub fn admin_pool(&self) -> &PgPool {
        &self.admin
    }

    pub fn template(&self) -> &Template {
        &self.template
    }

    /// Applies a change to this process's caches.
    pub async fn apply(&self, change: &Change) {
        match change {
            Change::Org(slug) => self.router.invalidate(slug).await,
            Change::TokenRevoked(hash) => self.auth.forget(hash).await,
            Change::Everything => {
                self.router.invalidate_all();
                self.auth.forget_all();
            }
        }
    }

    #[tracing::instrument(skip(self, new), fields(slug = %new.slug))]
    pub async fn create_org(&self, new: &NewOrg) -> Result<Created, Error> {
        let created = provision::create_org(&self.admin, &self.template, new).await?;
        // The slug may be cached as unknown.
        self.apply(&Change::Org(new.slug.clone())).await;
        self.created.notify_one();
        Ok(created)
    }

    /// Keeps `target` warm schemas ready (see `warm`), refilling after each
    /// org created here.
    pub fn spawn_warm_refill(&self, target: usize) -> tokio::task::JoinHandle<()> {
        crate::warm::spawn_refill(
            self.admin.clone(),
            self.template.clone(),
            target,
            self.created.clone(),
        )
    }

    /// Copies org `source` into a new org `slug` (see `archive::clone_org`).
    pub async fn clone_org(
        &self,
        source: &Slug,
        slug: &Slug,
        name: Option<&str>,
    ) -> Result<crate::archive::Imported, Error> {
        let cloned =
            crate::archive::clone_org(&self.admin, &self.template, source, slug, name).await?;
        // The slug may be cached as unknown.
        self.apply(&Change::Org(slug.clone())).await;
        Ok(cloned)
    }

    pub async fn suspend_org(&self, slug: &Slug) -> Result<Organization, Error> {
        let org = provision::suspend_org(&self.admin, slug).await?;
        self.apply(&Change::Org(slug.clone())).await;
        Ok(org)
    }

    pub async fn resume_org(&self, slug: &Slug) -> Result<Organization, Error> {
        let org = provision::resume_org(&self.admin, slug).await?;
        self.apply(&Change::Org(slug.clone())).await;
        Ok(org)
    }

    pub async fn rename_org(&self, slug: &Slug, new_slug: &Slug) -> Result<Organization, Error> {
        let org = provision::rename_org(&self.admin, slug, new_slug).await?;
        self.apply(&Change::Org(slug.clone())).await;
        self.apply(&Change::Org(new_slug.clone())).await;
        Ok(org)
    }

    pub async fn delete_org(&self, slug: &Slug) -> Result<Organization, Error> {
        let org = provision::delete_org(&self.admin, slug).await?;
        self.apply(&Change::Org(slug.clone())).await;
        Ok(org)
    }

    pub async fn issue_org_token(
        &self,
        slug: &Slug,
        email: &str,
        name: Option<&str>,
        expires_in: Option<Duration>,
    ) -> Result<(User, IssuedToken), Error> {
        provision::issue_org_token(&self.admin, slug, email, name, expires_in).await
    }

    /// Revokes a token, here at once and in other processes as soon as they
    /// hear the notification. False when there was no active token `id`.
    pub async fn revoke_token(&self, id: Uuid) -> Result<bool, Error> {
        match provision::revoke_token(&self.admin, id).await? {
            Some(hash) => {
                self.apply(&Change::TokenRevoked(hash)).await;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// True while the listener is connected and listening.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Waits until the listener is listening (for tests and readiness).
    pub async fn wait_listening(&self) {
        let mut rx = self.listening.subscribe();
        let _ = rx.wait_for(|on| *on).await;
    }

    /// Listens for other processes' changes and applies them. While the
    /// listener reconnects, notifications are lost, so every (re)connect
    /// forgets everything cached.
    pub fn spawn_listener(&self, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let tenancy = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = tenancy.listen(&pool).await {
                    tracing::warn!(error = %e, "registry listener failed; retrying");
                }
                tenancy.listening.send_replace(false);
                tenancy.apply(&Change::Everything).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(REGISTRY_CHANNEL).await?;
        // Anything announced before LISTEN took effect is unknown to us.
        self.apply(&Change::Everything).await;
        self.listening.send_replace(true);
        loop {
            match listener.try_recv().await? {
                Some(n) => self.apply(&Change::parse(n.payload())).await,
                None => {
                    // the connection dropped and was re-established
                    self.apply(&Change::Everything).await;
                }
            }
        }
    }
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
