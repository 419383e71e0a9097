-- The fingerprint of the initial data a warm schema was built with (the
-- shared catalog's initial presets then). A signup that takes a schema
-- whose fingerprint is not the current one (settings.initial_data_seed)
-- reloads its initial data; NULL (schemas built before the catalog) never
-- matches.
ALTER TABLE tenantry.warm_schemas ADD COLUMN seed text;

-- The current fingerprint, refreshed in the transaction of every catalog
-- change made through tenantry and of every shared migration, so that a
-- signup compares it with one read of a registry row.
ALTER TABLE tenantry.settings ADD COLUMN initial_data_seed text;

-- The fingerprint of the initial data a new org gets now: the shared
-- catalog's initial presets (names and descriptions, in seeding order).
-- PL/pgSQL, so that the registry can be created before the shared schema,
-- and so that on Citus the statement that stores it (on a local registry
-- table) reads the reference tables in a query of its own.
CREATE FUNCTION tenantry.initial_data_fingerprint() RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN md5(
        coalesce((SELECT string_agg(quote_nullable(name) || ':' || quote_nullable(description), ','
                                    ORDER BY created_at, name)
                  FROM shared.catalog_statuses WHERE initial), '')
        || '|' ||
        coalesce((SELECT string_agg(quote_nullable(name) || ':' || quote_nullable(description), ','
                                    ORDER BY created_at, name)
                  FROM shared.catalog_behaviors WHERE initial), ''));
END
$$;
REVOKE ALL ON FUNCTION tenantry.initial_data_fingerprint() FROM PUBLIC;
