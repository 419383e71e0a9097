#!/bin/sh
# The `db-replica` service (docker-compose.yml): the first time, copies
# `db` with pg_basebackup -R (which makes it a standby streaming from
# `db`); then runs PostgreSQL on that copy.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pg_basebackup -h db -U tenantry -D "$PGDATA" -R -X stream -c fast
  chmod 0700 "$PGDATA"
fi
exec postgres
