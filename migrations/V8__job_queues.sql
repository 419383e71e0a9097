-- The ready index of background jobs (see src/jobs and docs/jobs.md). Jobs
-- themselves live in each org's schema (table tenantry_jobs, owned by the
-- org's role); this table holds one row per org that may have a job due, so
-- that a worker finds the next org to serve with one index probe however
-- many orgs and jobs there are. A row is a hint, never the truth: a worker
-- that finds nothing due in the org's schema removes it, and the sweep adds
-- back rows that a crash between a commit and its hint left out.
CREATE TABLE tenantry.job_queues (
    org_id  uuid PRIMARY KEY REFERENCES tenantry.organizations (id) ON DELETE CASCADE,
    -- when the org may next be served: its earliest due job, or later once
    -- served (round robin: a served org goes behind every waiting one)
    turn_at timestamptz NOT NULL,
    -- bumped by every hint, so that a worker removes the row only if no
    -- job was announced since it looked
    seq     bigint NOT NULL DEFAULT 0
);
CREATE INDEX job_queues_turn_at ON tenantry.job_queues (turn_at);

-- Called after a tenant transaction that enqueued commits, on the serving
-- role's connection. It can only say "org X may have a job due at T" for an
-- existing org (a false hint costs a worker one look), and wakes the
-- workers listening on tenantry_jobs.
CREATE FUNCTION tenantry.serving_jobs_due(p_org uuid, p_at timestamptz)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog AS $$
    INSERT INTO tenantry.job_queues AS q (org_id, turn_at)
    SELECT o.id, p_at FROM tenantry.organizations o WHERE o.id = p_org
    ON CONFLICT (org_id) DO UPDATE
        SET turn_at = LEAST(q.turn_at, EXCLUDED.turn_at), seq = q.seq + 1;
    SELECT pg_notify('tenantry_jobs', '');
$$;
REVOKE ALL ON FUNCTION tenantry.serving_jobs_due(uuid, timestamptz) FROM PUBLIC;

DO $$
DECLARE r text;
BEGIN
    FOR r IN SELECT s.role FROM tenantry.serving_roles s JOIN pg_roles p ON p.rolname = s.role LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION tenantry.serving_jobs_due(uuid, timestamptz) TO %I', r);
    END LOOP;
END
$$;
