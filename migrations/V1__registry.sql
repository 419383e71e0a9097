-- Registry (control plane) v1. Runs with search_path = tenantry; names are
-- qualified anyway so the file reads the same wherever it is pasted.

CREATE TABLE tenantry.organizations (
    id               uuid PRIMARY KEY,
    slug             text NOT NULL UNIQUE,
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    schema_name      text NOT NULL UNIQUE,
    status           text NOT NULL
                     CHECK (status IN ('provisioning', 'active', 'suspended', 'deleting')),
    template_version integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A user belongs to one organization; platform superusers may belong to none.
CREATE TABLE tenantry.users (
    id              uuid PRIMARY KEY,
    organization_id uuid REFERENCES tenantry.organizations (id) ON DELETE CASCADE,
    email           text NOT NULL CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 320),
    display_name    text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    is_superuser    boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (organization_id IS NOT NULL OR is_superuser),
    UNIQUE (id, organization_id)
);
CREATE UNIQUE INDEX users_org_email_key ON tenantry.users (organization_id, email)
    WHERE organization_id IS NOT NULL;
CREATE UNIQUE INDEX users_platform_email_key ON tenantry.users (email)
    WHERE organization_id IS NULL;

-- Only the SHA-256 digest of a token's secret is stored; `prefix` is a short
-- non-secret handle for listings.
CREATE TABLE tenantry.api_tokens (
    id              uuid PRIMARY KEY,
    user_id         uuid NOT NULL,
    organization_id uuid REFERENCES tenantry.organizations (id) ON DELETE CASCADE,
    secret_hash     bytea NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    prefix          text NOT NULL,
    name            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz,
    -- a token acts for its user's organization and no other
    FOREIGN KEY (user_id, organization_id) REFERENCES tenantry.users (id, organization_id)
        ON DELETE CASCADE,
    FOREIGN KEY (user_id) REFERENCES tenantry.users (id) ON DELETE CASCADE
);
CREATE INDEX api_tokens_user_idx ON tenantry.api_tokens (user_id);
