-- 010_webhooks: balance alerts and events delivered as signed webhooks
-- (issue 12, item 4; billing/webhooks.c, billing/alerts.c,
-- billing/whdeliver.c). Billing alone reads and writes these tables; the
-- gateway's role (006) gets no grant on any of them.
--
-- The events table is an outbox: an event is inserted in the transaction
-- that makes its change (a credit entry, a key revoke, a threshold
-- crossing), with one delivery row per enabled endpoint of the account, so
-- an event exists iff its change committed and a billing crash loses none.
-- The delivery thread claims due deliveries (FOR UPDATE SKIP LOCKED, with a
-- lease in next_attempt_at) and records every attempt.

-- An account's webhook endpoints (at most WEBHOOK_MAX_ENDPOINTS, checked
-- under the account's row lock). The signing secret is needed in clear to
-- sign, so it is stored encrypted (XChaCha20-Poly1305 with a key derived
-- from KEY_PEPPER, the account id as associated data): 24-byte nonce, then
-- the ciphertext and its tag.
CREATE TABLE webhook_endpoints (
    id          bigserial PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts(id),
    url         text NOT NULL CHECK (length(url) BETWEEN 8 AND 2048),
    secret_enc  bytea NOT NULL CHECK (length(secret_enc) BETWEEN 40 AND 200),
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints(account_id);

-- Thresholds with their crossing state, one row per (account, kind,
-- threshold): kind 'low' (balance.low, the account's thresholds, at most
-- WEBHOOK_MAX_THRESHOLDS) or 'exhausted' (balance.exhausted, one per
-- account; threshold = exhausted_below). A row fires when it is armed and
-- the balance (credited - spent) falls below its threshold, and is armed
-- again once the balance is back at or above it; the flag and the event
-- change in one transaction, so each crossing fires once, across restarts.
CREATE TABLE balance_alerts (
    account_id  bigint NOT NULL REFERENCES accounts(id),
    kind        text NOT NULL CHECK (kind IN ('low', 'exhausted')),
    threshold   bigint NOT NULL CHECK (threshold BETWEEN 1 AND 1000000000000),
    armed       boolean NOT NULL,
    fired_at    timestamptz,
    armed_at    timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, kind, threshold)
);
CREATE UNIQUE INDEX balance_alerts_one_exhausted ON balance_alerts(account_id)
    WHERE kind = 'exhausted';

-- The events outbox. payload is the event's "data" object.
CREATE TABLE webhook_events (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id  bigint NOT NULL REFERENCES accounts(id),
    type        text NOT NULL CHECK (type IN ('balance.low', 'balance.exhausted',
                                              'topup.created', 'adjustment.created',
                                              'key.revoked')),
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_account ON webhook_events(account_id, created_at);
CREATE INDEX webhook_events_created ON webhook_events(created_at);

-- One delivery per (event, endpoint). scheduled_at starts the retry horizon
-- (WEBHOOK_RETRY_HORIZON_S, 24 h; a replay starts it again). attempts counts
-- the attempts begun (raised when an attempt is claimed, so a crash
-- mid-attempt still counts it). claimed_by names the billing process whose
-- lease (next_attempt_at in the future) covers an attempt in flight.
CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        uuid NOT NULL REFERENCES webhook_events(id) ON DELETE CASCADE,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    scheduled_at    timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claimed_by      text,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    failed_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries(endpoint_id, id);

-- Every attempt: its number, when, how long, the status code or the
-- transport error, and at most WEBHOOK_RESPONSE_PREFIX bytes of the answer.
CREATE TABLE webhook_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    duration_ms  integer NOT NULL,
    status_code  integer,
    error        text CHECK (length(error) <= 300),
    response     text CHECK (length(response) <= 256),
    next_attempt_at timestamptz
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts(delivery_id, id);
