//! [`Orgs`]: the one entry point for every change to an org and its
//! tokens, for the HTTP API, the CLI and embedding apps alike.
//!
//! Each change is validated and applied by the tenant-schema layer in one
//! transaction that also announces it (NOTIFY, see `registry::changes`),
//! so every listening process hears of it on commit. Here it is then
//! applied at once to this process's own caches, when it has any (a
//! server does; the CLI has none and relies on the announcement).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::io::AsyncRead;
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::ident::Slug;
use crate::registry::changes::Change;
use crate::registry::{IssuedToken, Organization, User};
use crate::serving::auth::Authenticator;
use crate::serving::router::TenantRouter;
use crate::tenants::archive::{self, Imported};
use crate::tenants::placement::{self, MoveProgress, Moved};
use crate::tenants::provision::{self, Created, NewOrg};
use crate::tenants::template::Template;

/// The caches of a serving process that org changes must reach at once
/// (invariant 6, `docs/invariants.md`).
#[derive(Clone)]
pub struct Caches {
    pub router: TenantRouter,
    pub auth: Authenticator,
}

impl Caches {
    /// Applies a change to these caches.
    pub async fn apply(&self, change: &Change) {
        match change {
            Change::Org(slug) => {
                self.router.invalidate(slug).await;
                self.router.hold_reads_to_now().await;
            }
            Change::TokenRevoked(hash) => self.auth.forget(hash).await,
            Change::Everything => {
                self.router.invalidate_all();
                self.auth.forget_all();
                self.router.hold_reads_to_now().await;
            }
        }
    }
}

/// Org changes on the registry of `admin`, with the tenant template they
/// build schemas from.
#[derive(Clone)]
pub struct Orgs {
    admin: PgPool,
    template: Arc<Template>,
    caches: Option<Caches>,
    /// Told of every org created here, for the warm pool's refill task.
    created: Arc<tokio::sync::Notify>,
}

impl Orgs {
    /// Changes made by a process without caches of its own (the CLI, a
    /// script): other processes hear of them through the announcement.
    pub fn new(admin: PgPool, template: Arc<Template>) -> Self {
        Orgs {
            admin,
            template,
            caches: None,
            created: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Changes that also reach `caches` at once.
    pub fn with_caches(mut self, caches: Caches) -> Self {
        self.caches = Some(caches);
        self
    }

    /// The pool of the admin role: registry writes, provisioning.
    pub fn admin_pool(&self) -> &PgPool {
        &self.admin
    }

    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    /// Resolves whenever an org was created through these `Orgs`.
    pub(crate) fn created(&self) -> Arc<tokio::sync::Notify> {
        self.created.clone()
    }

    async fn changed(&self, change: Change) {
        if let Some(caches) = &self.caches {
            caches.apply(&change).await;
        }
    }

    #[tracing::instrument(skip(self, new), fields(slug = %new.slug))]
    pub async fn create(&self, new: &NewOrg) -> Result<Created, Error> {
        let created = provision::create_org(&self.admin, &self.template, new).await?;
        // The slug may be cached as unknown.
        self.changed(Change::Org(new.slug.clone())).await;
        self.created.notify_one();
        Ok(created)
    }

    /// Copies org `source` into a new org `slug` (see `archive::clone_org`).
    #[tracing::instrument(skip(self, name))]
    pub async fn clone_org(
        &self,
        source: &Slug,
        slug: &Slug,
        name: Option<&str>,
    ) -> Result<Imported, Error> {
        let cloned = archive::clone_org(&self.admin, &self.template, source, slug, name).await?;
        self.changed(Change::Org(slug.clone())).await;
        Ok(cloned)
    }

    /// Creates org `slug` from an archive (see `archive::import`).
    #[tracing::instrument(skip(self, name, input))]
    pub async fn import(
        &self,
        slug: &Slug,
        name: Option<&str>,
        input: impl AsyncRead + Unpin,
    ) -> Result<Imported, Error> {
        let imported = archive::import(&self.admin, &self.template, slug, name, input).await?;
        self.changed(Change::Org(slug.clone())).await;
        Ok(imported)
    }

    #[tracing::instrument(skip(self))]
    pub async fn suspend(&self, slug: &Slug) -> Result<Organization, Error> {
        let org = provision::suspend_org(&self.admin, slug).await?;
        self.changed(Change::Org(slug.clone())).await;
        Ok(org)
    }

    #[tracing::instrument(skip(self))]
    pub async fn resume(&self, slug: &Slug) -> Result<Organization, Error> {
        let org = provision::resume_org(&self.admin, slug).await?;
        self.changed(Change::Org(slug.clone())).await;
        Ok(org)
    }

    #[tracing::instrument(skip(self))]
    pub async fn rename(&self, slug: &Slug, new_slug: &Slug) -> Result<Organization, Error> {
        let org = provision::rename_org(&self.admin, slug, new_slug).await?;
        self.changed(Change::Org(slug.clone())).await;
        self.changed(Change::Org(new_slug.clone())).await;
        Ok(org)
    }

    #[tracing::instrument(skip(self))]
    pub async fn delete(&self, slug: &Slug) -> Result<Organization, Error> {
        let org = provision::delete_org(&self.admin, slug).await?;
        self.changed(Change::Org(slug.clone())).await;
        Ok(org)
    }

    /// Moves org `slug` to Citus worker `to` (`host:port`), telling
    /// `progress` how far the copy has got. Routing does not change: the
    /// coordinator routes by schema wherever it lives.
    #[tracing::instrument(skip(self, progress))]
    pub async fn move_to(
        &self,
        slug: &Slug,
        to: &str,
        progress: impl FnMut(MoveProgress) + Send,
    ) -> Result<Moved, Error> {
        placement::move_org_reporting(&self.admin, slug, to, progress).await
    }

    #[tracing::instrument(skip(self, name))]
    pub async fn issue_org_token(
        &self,
        slug: &Slug,
        email: &str,
        name: Option<&str>,
        expires_in: Option<Duration>,
    ) -> Result<(User, IssuedToken), Error> {
        provision::issue_org_token(&self.admin, slug, email, name, expires_in).await
    }

    #[tracing::instrument(skip(self, name))]
    pub async fn issue_superuser_token(
        &self,
        email: &str,
        name: Option<&str>,
        expires_in: Option<Duration>,
    ) -> Result<(User, IssuedToken), Error> {
        provision::issue_superuser_token(&self.admin, email, name, expires_in).await
    }

    /// Revokes a token, here at once and in other processes as soon as they
    /// hear the notification. False when there was no active token `id`.
    #[tracing::instrument(skip(self))]
    pub async fn revoke_token(&self, id: Uuid) -> Result<bool, Error> {
        match provision::revoke_token(&self.admin, id).await? {
            Some(hash) => {
                self.changed(Change::TokenRevoked(hash)).await;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
