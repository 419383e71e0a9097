-- The login roles of servers' tenant connections. Each is a member of every
-- tenant role (granted when a tenant is created), so it may SET ROLE to it
-- inside a tenant transaction; see src/roles.rs.
CREATE TABLE tenantry.serving_roles (
    role          text PRIMARY KEY,
    registered_at timestamptz NOT NULL DEFAULT now()
);
