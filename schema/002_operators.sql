-- 002_operators: named operators with their own bearer tokens, beyond the
-- two bootstrap tokens of the environment. Tokens are stored only as keyed
-- BLAKE2b hashes (KEY_PEPPER), like API keys; revoking takes effect on the
-- next call (the admin API looks operators up on every call, no cache).
CREATE TABLE operators (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    role        text NOT NULL CHECK (role IN ('admin', 'finance')),
    token_hash  text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
