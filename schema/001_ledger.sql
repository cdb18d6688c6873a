-- 001_ledger: accounts, API keys, the credit ledger, settled charges and the
-- daily usage rollup. Points are bigint everywhere.
--
-- credited/spent on accounts are running totals kept in the same transaction
-- as the rows they sum (ledger_entries, charges), so reading a balance never
-- scans history. credited is capped at 2^53-1: the Redis Lua scripts compute
-- with doubles, exact up to there.

CREATE TABLE accounts (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    credited    bigint NOT NULL DEFAULT 0 CHECK (credited BETWEEN 0 AND 9007199254740991),
    spent       bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
    credit_seq  bigint NOT NULL DEFAULT 0 CHECK (credit_seq >= 0)
);

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id),
    key_hash    text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_account ON api_keys(account_id);

-- Every credit (top-up or signed adjustment). credit_seq is the account's
-- sequence number after this entry: Redis takes (credit_seq, credited_after)
-- only when newer than its own.
CREATE TABLE ledger_entries (
    id              bigserial PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts(id),
    kind            text NOT NULL CHECK (kind IN ('topup', 'adjustment')),
    amount          bigint NOT NULL CHECK (amount <> 0 AND amount BETWEEN -1000000000000 AND 1000000000000),
    reference       text CHECK (length(reference) BETWEEN 1 AND 200),
    reason          text CHECK (length(reason) BETWEEN 1 AND 500),
    credit_seq      bigint NOT NULL,
    credited_after  bigint NOT NULL,
    operator        text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, credit_seq),
    CHECK (kind <> 'topup' OR (amount > 0 AND reference IS NOT NULL)),
    CHECK (kind <> 'adjustment' OR reason IS NOT NULL)
);
CREATE UNIQUE INDEX ledger_entries_reference ON ledger_entries(account_id, reference)
    WHERE reference IS NOT NULL;
CREATE INDEX ledger_entries_account_time ON ledger_entries(account_id, created_at);

-- One row per settled call, charged or not; the reservation id makes the
-- settlement worker's writes idempotent (a redelivered outbox entry is a no-op).
CREATE TABLE charges (
    reservation_id  text PRIMARY KEY,
    account_id      bigint NOT NULL REFERENCES accounts(id),
    route           text NOT NULL,
    amount          bigint NOT NULL CHECK (amount >= 0),
    hold            bigint NOT NULL CHECK (hold >= 0),
    outcome         text NOT NULL CHECK (outcome IN ('commit', 'release', 'expire')),
    status          integer NOT NULL,
    occurred_at     timestamptz NOT NULL,
    settled_at      timestamptz NOT NULL DEFAULT now()
);
-- No further index: reports read usage_daily, and every extra index is paid
-- on each of the many inserts settlement makes.

-- Daily rollup (UTC days) maintained in the same transaction as the charges,
-- so reports never scan charges.
CREATE TABLE usage_daily (
    account_id    bigint NOT NULL REFERENCES accounts(id),
    day           date NOT NULL,
    route         text NOT NULL,
    calls         bigint NOT NULL DEFAULT 0,
    points        bigint NOT NULL DEFAULT 0,
    failed_calls  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, day, route)
);
CREATE INDEX usage_daily_day ON usage_daily(day);
