//! Per-tenant admission: at most `max_in_flight` transactions of one tenant
//! run (or wait for a connection) at once. Further ones queue here, outside
//! the pools, for at most `queue`; then they fail with
//! [`Error::TenantBusy`] (429 `tenant_busy` with `Retry-After`). A noisy
//! tenant thus holds a bounded share of the connections, and its backlog
//! waits in its own queue instead of in front of its neighbours'
//! transactions.
//!
//! Only tenants with a transaction in flight have an entry, so memory
//! follows concurrency, not the number of tenants.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::base::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FairnessConfig {
    /// Transactions one tenant may have in flight at once; 0: no limit.
    pub max_in_flight: u32,
    /// How long a transaction beyond the limit waits for a place.
    pub queue: Duration,
}

impl FairnessConfig {
    /// The default for a tenant pool of `pool_size` connections: a quarter
    /// of it (at least 2, so that work holding one transaction may open
    /// another), queueing up to [`DEFAULT_QUEUE`].
    pub fn for_pool(pool_size: u32) -> Self {
        FairnessConfig {
            max_in_flight: (pool_size / 4).max(2),
            queue: DEFAULT_QUEUE,
        }
    }
}

/// Long enough to absorb a burst of quick requests, short enough that a
/// client of a saturated tenant hears "slow down" instead of timing out.
pub const DEFAULT_QUEUE: Duration = Duration::from_millis(200);

pub struct TenantLimiter {
    config: FairnessConfig,
    /// Sharded: every transaction takes and gives back a place here.
    in_flight: DashMap<Uuid, Arc<Semaphore>>,
}

/// A tenant's place among its transactions in flight; released when
/// dropped.
pub struct TenantSlot {
    limiter: Arc<TenantLimiter>,
    tenant: Uuid,
    semaphore: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl TenantLimiter {
    pub fn new(config: FairnessConfig) -> Arc<Self> {
        Arc::new(TenantLimiter {
            config,
            in_flight: DashMap::new(),
        })
    }

    pub fn config(&self) -> FairnessConfig {
        self.config
    }

    /// A place for a transaction of `tenant`: at once when the tenant has
    /// fewer than `max_in_flight`, else after queueing (FIFO) for up to
    /// `queue`. `None` when there is no limit. Cancel-safe: a dropped
    /// waiter leaves the queue.
    pub async fn admit(self: &Arc<Self>, tenant: &Uuid) -> Result<Option<TenantSlot>, Error> {
        let max = self.config.max_in_flight;
        if max == 0 {
            return Ok(None);
        }
        // cloned under the entry's shard lock, see `TenantSlot::drop`
        let semaphore = self
            .in_flight
            .entry(*tenant)
            .or_insert_with(|| Arc::new(Semaphore::new(max as usize)))
            .clone();
        // From here on the slot owns the semaphore's reference: dropping it
        // (also on timeout or cancellation) removes an unused entry.
        let mut slot = TenantSlot {
            limiter: self.clone(),
            tenant: *tenant,
            semaphore,
            permit: None,
        };
        let permit = match slot.semaphore.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                crate::telemetry::tenant_limit("queued");
                let waiting = slot.semaphore.clone().acquire_owned();
                match tokio::time::timeout(self.config.queue, waiting).await {
                    Ok(permit) => permit.expect("tenant semaphores are never closed"),
                    Err(_) => {
                        crate::telemetry::tenant_limit("rejected");
                        return Err(Error::TenantBusy { max_in_flight: max });
                    }
                }
            }
        };
        slot.permit = Some(permit);
        Ok(Some(slot))
    }

    /// Tenants with a transaction in flight or queued.
    pub fn busy_tenants(&self) -> usize {
        self.in_flight.len()
    }
}

impl TenantSlot {
    /// The tenant's transactions holding a place, this one included; those
    /// still queued for one hold no connection and are not counted.
    pub fn in_flight(&self) -> usize {
        let max = self.limiter.config.max_in_flight as usize;
        max.saturating_sub(self.semaphore.available_permits())
            .max(1)
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        // Clones are only made under the entry's shard lock, which
        // `remove_if` holds while it looks: the map's and ours are the last
        // two when no other transaction of the tenant runs or waits.
        self.limiter
            .in_flight
            .remove_if(&self.tenant, |_, semaphore| {
                Arc::strong_count(semaphore) == 2
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tenant_beyond_its_limit_waits_then_is_refused_and_others_pass() {
        let limiter = TenantLimiter::new(FairnessConfig {
            max_in_flight: 2,
            queue: Duration::from_millis(30),
        });
        let (noisy, quiet) = (Uuid::new_v4(), Uuid::new_v4());
        let a = limiter.admit(&noisy).await.unwrap();
        let _b = limiter.admit(&noisy).await.unwrap();
        let refused = limiter.admit(&noisy).await;
        assert!(
            matches!(refused, Err(Error::TenantBusy { max_in_flight: 2 })),
            "{:?}",
            refused.err()
        );
        // another tenant is not affected
        assert!(limiter.admit(&quiet).await.unwrap().is_some());
        // a queued transaction gets the place a finishing one frees
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.admit(&noisy).await.map(|s| s.is_some()) })
        };
        tokio::task::yield_now().await;
        drop(a);
        assert!(waiter.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn in_flight_counts_the_tenants_admitted_transactions_only() {
        let limiter = TenantLimiter::new(FairnessConfig {
            max_in_flight: 3,
            queue: Duration::from_secs(5),
        });
        let (tenant, other) = (Uuid::new_v4(), Uuid::new_v4());
        let a = limiter.admit(&tenant).await.unwrap().unwrap();
        assert_eq!(a.in_flight(), 1);
        let b = limiter.admit(&tenant).await.unwrap().unwrap();
        let _c = limiter.admit(&tenant).await.unwrap().unwrap();
        let _elsewhere = limiter.admit(&other).await.unwrap().unwrap();
        assert_eq!((a.in_flight(), b.in_flight()), (3, 3));
        // one queued behind them: it holds no connection, so it is not counted
        let queued = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.admit(&tenant).await.map(|s| s.is_some()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(a.in_flight(), 3);
        drop(b);
        assert!(queued.await.unwrap().unwrap());
        assert_eq!(
            a.in_flight(),
            2,
            "the queued one got b's place and has ended"
        );
    }

    #[tokio::test]
    async fn entries_live_only_while_transactions_are_in_flight() {
        let limiter = TenantLimiter::new(FairnessConfig {
            max_in_flight: 1,
            queue: Duration::from_millis(10),
        });
        let tenant = Uuid::new_v4();
        let slot = limiter.admit(&tenant).await.unwrap();
        assert_eq!(limiter.busy_tenants(), 1);
        assert!(limiter.admit(&tenant).await.is_err());
        assert_eq!(limiter.busy_tenants(), 1);
        drop(slot);
        assert_eq!(limiter.busy_tenants(), 0);
        let unlimited = TenantLimiter::new(FairnessConfig {
            max_in_flight: 0,
            queue: Duration::ZERO,
        });
        assert!(unlimited.admit(&tenant).await.unwrap().is_none());
        assert_eq!(unlimited.busy_tenants(), 0);
    }
}
