-- 011_charges_partitioned: the charges table partitioned by day, and the
-- periods that freeze a month's statement.
--
-- Partition key. Each row's day comes from its reservation id, not from
-- when the call ended: the gateway's ids (gateway/worker.c) start with the
-- 48-bit Unix time in milliseconds of the reserve, in hex. The key being a
-- function of the id alone is what keeps settlement exactly once across
-- partitions: a redelivered record computes the same reserved_at, so it
-- meets its row in the same partition, where the primary key (reservation_id,
-- reserved_at) is unique, and ON CONFLICT DO NOTHING holds as it did on the
-- unpartitioned table. (Keyed by occurred_at, a record settled twice with two
-- end times could land twice.) Ids of any other shape, or whose time is
-- not in 2000..2099 (tests, hand-made records), map to 1970 and land in
-- charges_legacy. Billing computes the same key in C (ledger_reserved_ms:
-- the regex here costs settlement's insert microseconds per row).
--
-- Partitions are daily (UTC), named charges_pYYYYMMDD, listed with their
-- state in charge_partitions: created ahead by charges_ensure_partitions
-- (billing's archive thread, billing/archive.c, keeps two weeks ahead);
-- past CHARGE_RETENTION_DAYS detached, exported to ARCHIVE_DIR and dropped,
-- and then never created again, so that a record for a dropped day finds
-- no partition and goes to the dead letter, visibly.
--
-- Moving the rows: they are copied into the new table, with their key, and
-- counted before the old table goes, all in this migration's transaction
-- under an exclusive lock. That rewrites the table once (a million rows take
-- a few seconds here; README "Ledger retention"): run `billing migrate` in
-- a quiet moment, as for 004.
--
-- Periods. A month whose statement has been issued is closed (a row in
-- ledger_periods; `billing period close`, or billing itself
-- STATEMENT_CLOSE_DAYS after the month's end). A charge settled later for a
-- call in a closed month keeps its occurred_at but is booked on the day it
-- is settled (booked_on, NULL when it is booked on its own day), so that an
-- issued statement never changes (billing/ledger.c).
ALTER TABLE charges RENAME TO charges_unpartitioned;
ALTER INDEX charges_pkey RENAME TO charges_unpartitioned_pkey;
DROP TRIGGER charges_accounts_exist ON charges_unpartitioned;

-- Not STRICT, so that the planner inlines it (a SQL function it cannot
-- inline runs through the SQL-function executor: tens of microseconds per
-- row, paid by every insert and lookup). A NULL id gives 1970, as any
-- other id not of the gateway's shape; no NULL id passes the NOT NULL.
CREATE FUNCTION charges_reserved_at(rid text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN rid !~ '^[0-9a-f]{32}$' THEN timestamptz '1970-01-01 00:00:00+00'
        WHEN ('x' || substr(rid, 1, 12))::bit(48)::bigint NOT BETWEEN 946684800000 AND 4102444799999
            THEN timestamptz '1970-01-01 00:00:00+00'
        ELSE to_timestamp(('x' || substr(rid, 1, 12))::bit(48)::bigint / 1000.0) END
$$;

CREATE TABLE charges (
    reservation_id  text COLLATE "C" NOT NULL,
    account_id      bigint NOT NULL,
    route           text NOT NULL,
    amount          bigint NOT NULL CONSTRAINT charges_amount_check CHECK (amount >= 0),
    hold            bigint NOT NULL CONSTRAINT charges_hold_check CHECK (hold >= 0),
    outcome         text NOT NULL CONSTRAINT charges_outcome_check
                    CHECK (outcome IN ('commit', 'release', 'expire', 'late')),
    status          integer NOT NULL,
    occurred_at     timestamptz NOT NULL,
    settled_at      timestamptz NOT NULL DEFAULT now(),
    reserved_at     timestamptz NOT NULL,
    booked_on       date,
    PRIMARY KEY (reservation_id, reserved_at)
) PARTITION BY RANGE (reserved_at);

CREATE TRIGGER charges_accounts_exist AFTER INSERT ON charges
    REFERENCING NEW TABLE AS new_charges
    FOR EACH STATEMENT EXECUTE FUNCTION charges_check_accounts();

-- One row per partition; day_from..day_to (exclusive) in UTC days.
-- attached: receives rows; detached: out of charges, being exported;
-- archived: exported to file (rows, bytes, sha256 of the file) and dropped.
CREATE TABLE charge_partitions (
    day_from    date PRIMARY KEY,
    day_to      date NOT NULL,
    name        text NOT NULL UNIQUE,
    state       text NOT NULL DEFAULT 'attached'
                CHECK (state IN ('attached', 'detached', 'archived')),
    rows        bigint,
    bytes       bigint,
    file        text,
    sha256      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    archived_at timestamptz,
    CHECK (day_to > day_from),
    CHECK (state <> 'archived' OR (rows IS NOT NULL AND file IS NOT NULL))
);

CREATE TABLE charges_legacy PARTITION OF charges
    FOR VALUES FROM (MINVALUE) TO ('2000-01-01 00:00:00+00');
INSERT INTO charge_partitions (day_from, day_to, name)
    VALUES ('-infinity', '2000-01-01', 'charges_legacy');

-- Creates the daily partitions of P_FROM..P_TO (inclusive) that were never
-- made; a day once archived is not made again. Serialised by a transaction
-- advisory lock (several billing processes). Returns how many it made.
CREATE FUNCTION charges_ensure_partitions(p_from date, p_to date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    d date := p_from;
    n integer := 0;
    nm text;
BEGIN
    IF p_from < date '2000-01-01' OR p_to - p_from > 5000 THEN
        RAISE EXCEPTION 'charges_ensure_partitions: % .. % is out of range', p_from, p_to
            USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(74616, 11);
    WHILE d <= p_to LOOP
        IF NOT EXISTS (SELECT 1 FROM charge_partitions WHERE day_from = d) THEN
            nm := 'charges_p' || to_char(d, 'YYYYMMDD');
            EXECUTE format('CREATE TABLE %I PARTITION OF charges FOR VALUES FROM (%L) TO (%L)', nm,
                           (d::timestamp AT TIME ZONE 'UTC')::text,
                           ((d + 1)::timestamp AT TIME ZONE 'UTC')::text);
            INSERT INTO charge_partitions (day_from, day_to, name) VALUES (d, d + 1, nm);
            n := n + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN n;
END $$;

-- Takes partition P_NAME out of charges (billing/archive.c, before its
-- export): from then on no row can land in it, and a record for its days
-- finds no partition (dead letter). Only from attached.
CREATE FUNCTION charges_detach_partition(p_name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE charge_partitions SET state = 'detached' WHERE name = p_name AND state = 'attached';
    IF NOT FOUND THEN RETURN false; END IF;
    EXECUTE format('ALTER TABLE charges DETACH PARTITION %I', p_name);
    RETURN true;
END $$;

-- Records the export of detached partition P_NAME and drops it, at once.
CREATE FUNCTION charges_drop_partition(p_name text, p_rows bigint, p_bytes bigint, p_file text,
                                       p_sha256 text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE charge_partitions SET state = 'archived', rows = p_rows, bytes = p_bytes,
           file = p_file, sha256 = p_sha256, archived_at = now()
     WHERE name = p_name AND state = 'detached';
    IF NOT FOUND THEN RETURN false; END IF;
    EXECUTE format('DROP TABLE %I', p_name);
    RETURN true;
END $$;

-- The key of an existing row: its id's time when the id carries one, i.e.
-- when that time is within a day of when the call ended. Gateways before
-- the time-ordered ids made 32 random hex digits, which decode to random
-- instants (about 1% of them between 2000 and 2099): those rows go to
-- charges_legacy rather than to a random day decades away. Their outbox
-- entries were settled long ago, so no redelivery will look for them.
CREATE FUNCTION charges_migrated_at(rid text, occurred timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN abs(extract(epoch FROM charges_reserved_at(rid) - occurred)) <= 86400
        THEN charges_reserved_at(rid) ELSE timestamptz '1970-01-01 00:00:00+00' END
$$;

-- The partitions the existing rows need, two weeks ahead, then the rows.
DO $$
DECLARE
    lo_t timestamptz;
    hi_t timestamptz;
    lo date;
    hi date;
    before bigint;
    after bigint;
    today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    SELECT min(charges_migrated_at(reservation_id, occurred_at))
               FILTER (WHERE charges_migrated_at(reservation_id, occurred_at) > 'epoch'),
           max(charges_migrated_at(reservation_id, occurred_at)),
           count(*)
      INTO lo_t, hi_t, before FROM charges_unpartitioned;
    lo := least(coalesce((lo_t AT TIME ZONE 'UTC')::date, today), today - 1);
    lo := greatest(lo, date '2000-01-01');
    hi := greatest(coalesce((hi_t AT TIME ZONE 'UTC')::date, today), today + 14);

    PERFORM charges_ensure_partitions(lo, hi);
    INSERT INTO charges (reservation_id, account_id, route, amount, hold, outcome, status,
                         occurred_at, settled_at, reserved_at)
    SELECT reservation_id, account_id, route, amount, hold, outcome, status, occurred_at,
           settled_at, charges_migrated_at(reservation_id, occurred_at)
      FROM charges_unpartitioned;
    SELECT count(*) INTO after FROM charges;
    IF after <> before THEN
        RAISE EXCEPTION '011: % charges copied of %', after, before;
    END IF;
END $$;
DROP TABLE charges_unpartitioned;
DROP FUNCTION charges_migrated_at(text, timestamptz);

-- DDL on charges (CREATE ... PARTITION OF, DETACH, DROP) waits for every
-- statement on the table, and holds every later one back while it waits:
-- settlement and lookups with it. It gives up after 2 s instead (the
-- archive pass, or settlement's retry, tries again later).
ALTER FUNCTION charges_ensure_partitions(date, date) SET lock_timeout = '2s';
ALTER FUNCTION charges_detach_partition(text) SET lock_timeout = '2s';
ALTER FUNCTION charges_drop_partition(text, bigint, bigint, text, text) SET lock_timeout = '2s';

CREATE TABLE ledger_periods (
    month     date PRIMARY KEY CHECK (extract(day FROM month) = 1),
    closed_at timestamptz NOT NULL DEFAULT now(),
    closed_by text NOT NULL
);
