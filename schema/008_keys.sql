-- 008_keys: key management (issue 12). A key gets a name, an optional
-- expiry and optional route scopes; a rotation makes a new key and gives
-- the old one an expiry (its grace); version numbers the key's mirror
-- values in Redis (pg:key:<hash>, keypush.lua keeps the newest), so a
-- repair pass that read a key before a change cannot undo the change.
-- hint is the key's last 4 characters, for people to tell keys apart in a
-- list (4 of 43 random base64url characters: 24 of 256 bits, nothing a
-- guess can use).
ALTER TABLE api_keys
    ADD COLUMN name       text CHECK (length(name) BETWEEN 1 AND 100),
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN scopes     text[] CHECK (cardinality(scopes) BETWEEN 1 AND 16),
    ADD COLUMN hint       text CHECK (hint ~ '^[A-Za-z0-9_-]{4}$'),
    ADD COLUMN rotated_to bigint REFERENCES api_keys(id),
    ADD COLUMN version    bigint NOT NULL DEFAULT 1;
CREATE INDEX api_keys_rotated_to ON api_keys(rotated_to) WHERE rotated_to IS NOT NULL;
