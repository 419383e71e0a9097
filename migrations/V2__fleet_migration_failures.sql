-- The last failed fleet migration of each tenant, so `migrate status` can
-- list failed tenants after the run that found them has ended. A tenant's
-- row is removed when it migrates successfully.
CREATE TABLE tenantry.migration_failures (
    organization_id uuid PRIMARY KEY REFERENCES tenantry.organizations (id) ON DELETE CASCADE,
    from_version    integer NOT NULL,
    target_version  integer NOT NULL,
    migration       text,
    error           text NOT NULL,
    diverged        boolean NOT NULL DEFAULT false,
    failed_at       timestamptz NOT NULL DEFAULT now()
);
