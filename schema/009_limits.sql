-- 009_limits: rate limits and spending caps, set per account and per API
-- key (PUT /v1/accounts/{id}/limits, PUT /v1/keys/{id}/limits; billing
-- limits). The gateway enforces them from Redis (pg:{A}:lim, written by
-- limits.lua from a snapshot of these rows); Postgres is where they live.
--
-- A row holds every setting of its scope; NULL: not set. accounts'
-- limits_seq numbers the account's snapshots (raised by every change of the
-- account's or its keys' rows, in the same transaction), so that Redis
-- keeps the newest whatever order pushes arrive in.
CREATE TABLE account_limits (
    account_id    bigint PRIMARY KEY REFERENCES accounts(id),
    rate_quota    integer CHECK (rate_quota BETWEEN 1 AND 1000000),
    rate_window_s integer CHECK (rate_window_s BETWEEN 1 AND 86400),
    daily_cap     bigint CHECK (daily_cap BETWEEN 1 AND 9007199254740991),
    monthly_cap   bigint CHECK (monthly_cap BETWEEN 1 AND 9007199254740991),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_quota IS NULL) = (rate_window_s IS NULL))
);

CREATE TABLE key_limits (
    key_id        bigint PRIMARY KEY REFERENCES api_keys(id),
    account_id    bigint NOT NULL REFERENCES accounts(id),
    rate_quota    integer CHECK (rate_quota BETWEEN 1 AND 1000000),
    rate_window_s integer CHECK (rate_window_s BETWEEN 1 AND 86400),
    daily_cap     bigint CHECK (daily_cap BETWEEN 1 AND 9007199254740991),
    monthly_cap   bigint CHECK (monthly_cap BETWEEN 1 AND 9007199254740991),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((rate_quota IS NULL) = (rate_window_s IS NULL))
);
CREATE INDEX key_limits_account ON key_limits(account_id);

ALTER TABLE accounts ADD COLUMN limits_seq bigint NOT NULL DEFAULT 0;
