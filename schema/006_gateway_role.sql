-- 006_gateway_role: the gateway's own Postgres role, pointgate_gateway, may
-- read usage_daily and nothing else: /_billing/usage (gateway/usage.c) is
-- the gateway's only query. It cannot read keys, credits, charges or
-- accounts, and cannot write anything, so a compromised gateway cannot
-- change a balance in Postgres or learn what it does not serve.
--
-- Roles belong to the cluster, not to the database, so the role may already
-- exist (created by the deployment with LOGIN and a password, as
-- scripts/stack.sh and docker-compose do, or by an earlier database of the
-- same cluster). If it does not, it is created here NOLOGIN when the
-- migrating user may create roles; the deployment then gives it
-- `ALTER ROLE pointgate_gateway LOGIN PASSWORD '...'`. A migrating user that
-- may not create roles gets a notice and the grant is skipped: create the
-- role, then run `GRANT SELECT ON usage_daily TO pointgate_gateway` by hand
-- (README, "Least privilege"). A later migration that recreates usage_daily
-- must grant again.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pointgate_gateway') THEN
        IF EXISTS (SELECT 1 FROM pg_roles
                   WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
            CREATE ROLE pointgate_gateway NOLOGIN;
        ELSE
            RAISE WARNING 'role pointgate_gateway does not exist and % may not create it: '
                         'create it and GRANT SELECT ON usage_daily TO pointgate_gateway',
                         current_user;
            RETURN;
        END IF;
    END IF;
    GRANT SELECT ON usage_daily TO pointgate_gateway;
END
$$;
