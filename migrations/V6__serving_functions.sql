-- What a server reads and writes in the registry goes through these
-- functions, which run as their owner (the admin role that migrates the
-- registry). The serving login role, which is also the session role of
-- tenant connections, gets EXECUTE on them and no right on the tables (see
-- src/registry/roles.rs): SQL that leaves a tenant role (RESET ROLE) can
-- look up one org by its slug or id and one token by its digest, and can
-- list or read nothing else: not the orgs, not the users' emails, not the
-- tokens.
CREATE FUNCTION tenantry.serving_org_by_slug(p_slug text)
RETURNS TABLE (id uuid, slug text, name text, schema_name text, status text,
               template_version integer, created_at timestamptz, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT o.id, o.slug, o.name, o.schema_name, o.status, o.template_version,
           o.created_at, o.updated_at
    FROM tenantry.organizations o WHERE o.slug = p_slug
$$;

CREATE FUNCTION tenantry.serving_org_by_id(p_id uuid)
RETURNS TABLE (id uuid, slug text, name text, schema_name text, status text,
               template_version integer, created_at timestamptz, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT o.id, o.slug, o.name, o.schema_name, o.status, o.template_version,
           o.created_at, o.updated_at
    FROM tenantry.organizations o WHERE o.id = p_id
$$;

CREATE FUNCTION tenantry.serving_principal(p_hash bytea)
RETURNS TABLE (token_id uuid, user_id uuid, organization_id uuid, is_superuser boolean,
               expires_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT t.id, u.id, u.organization_id, u.is_superuser, t.expires_at
    FROM tenantry.api_tokens t JOIN tenantry.users u ON u.id = t.user_id
    WHERE t.secret_hash = p_hash AND t.revoked_at IS NULL
      AND (t.expires_at IS NULL OR t.expires_at > now())
$$;

CREATE FUNCTION tenantry.serving_record_token_use(p_ids uuid[])
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $$
    UPDATE tenantry.api_tokens SET last_used_at = now() WHERE id = ANY (p_ids)
$$;

-- The MAC key only lets a server refuse made-up tokens without a query:
-- knowing it authenticates no one (see V3).
CREATE FUNCTION tenantry.serving_token_key()
RETURNS bytea
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT token_key FROM tenantry.settings
$$;

CREATE FUNCTION tenantry.serving_legacy_token_prefixes()
RETURNS SETOF text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT prefix FROM tenantry.api_tokens WHERE format = 1 AND revoked_at IS NULL
$$;

REVOKE ALL ON FUNCTION tenantry.serving_org_by_slug(text), tenantry.serving_org_by_id(uuid),
    tenantry.serving_principal(bytea), tenantry.serving_record_token_use(uuid[]),
    tenantry.serving_token_key(), tenantry.serving_legacy_token_prefixes() FROM PUBLIC;
