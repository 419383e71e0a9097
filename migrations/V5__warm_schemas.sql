-- The warm pool: tenant schemas built ahead of signups (see src/warm.rs).
-- Each row is a schema and role named after an org id no organization has
-- yet; a signup deletes the row and inserts its organization with that id in
-- one transaction.
CREATE TABLE tenantry.warm_schemas (
    org_id           uuid PRIMARY KEY,
    schema_name      text NOT NULL UNIQUE,
    template_version integer NOT NULL,
    -- the id the owner user of the org that takes it gets: the schema's
    -- initial data is recorded as written by it
    author_id        uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX warm_schemas_by_version ON tenantry.warm_schemas (template_version, created_at);
