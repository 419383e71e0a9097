-- Shared template v1: the catalog of presets. Every org reads it (its role
-- has SELECT through the shared reader role); only the admin writes it.
-- Runs with search_path set to exactly the shared schema. Table names must
-- not be names of tenant tables (checked whenever a tenant template loads):
-- a tenant transaction searches its own schema first, then this one.

CREATE TABLE catalog_statuses (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    description text CHECK (length(description) <= 2000),
    -- new orgs start with every initial preset
    initial     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX catalog_statuses_name_key ON catalog_statuses (lower(name));

CREATE TABLE catalog_behaviors (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    description text CHECK (length(description) <= 2000),
    initial     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX catalog_behaviors_name_key ON catalog_behaviors (lower(name));

-- What every org started with before the catalog existed.
INSERT INTO catalog_statuses (name, initial) VALUES ('New', true), ('Active', true), ('Archived', true);
INSERT INTO catalog_behaviors (name, initial) VALUES ('Reliability', true), ('Compliance', true), ('Robustness', true);
