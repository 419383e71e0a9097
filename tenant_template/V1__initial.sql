-- Tenant template v1: the seed product's entities. Runs with search_path set
-- to exactly the tenant's schema, so names are unqualified on purpose.
-- created_by / updated_by hold user ids from the registry (tenantry.users);
-- no foreign key crosses into the registry so a tenant schema stays
-- self-contained (it can be dumped, moved or sharded on its own).

CREATE TABLE statuses (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    description text,
    created_by  uuid NOT NULL,
    updated_by  uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX statuses_name_key ON statuses (lower(name));

CREATE TABLE behaviors (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    description text,
    created_by  uuid NOT NULL,
    updated_by  uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX behaviors_name_key ON behaviors (lower(name));

CREATE TABLE tests (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    prompt           text NOT NULL CHECK (length(prompt) BETWEEN 1 AND 100000),
    expected_outcome text NOT NULL CHECK (length(expected_outcome) <= 100000),
    behavior_id      uuid NOT NULL REFERENCES behaviors (id) ON DELETE RESTRICT,
    status_id        uuid NOT NULL REFERENCES statuses (id) ON DELETE RESTRICT,
    created_by       uuid NOT NULL,
    updated_by       uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tests_status_id_idx ON tests (status_id, id);
CREATE INDEX tests_behavior_id_idx ON tests (behavior_id, id);
