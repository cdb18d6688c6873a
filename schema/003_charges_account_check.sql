-- 003_charges_account_check: a charge's account is checked once per
-- statement instead of once per row.
--
-- The foreign key charges.account_id -> accounts(id) ran one
-- `SELECT ... FOR KEY SHARE` on accounts per inserted charge. Settlement
-- inserts thousands of charges per statement, all for a handful of accounts,
-- and that check was about a third of Postgres's CPU per call under load
-- (measured with `make bench`: 10.5 -> 7.3 us per call without it). The
-- statement-level trigger below checks the distinct accounts of the whole
-- statement at once, with the same SQLSTATE (23503) as the foreign key, so
-- settlement still sees a refused charge as an integrity error and
-- dead-letters it. An account with charges still cannot be deleted: the same
-- transaction gives it usage_daily rows, whose foreign key stays.
ALTER TABLE charges DROP CONSTRAINT IF EXISTS charges_account_id_fkey;

CREATE FUNCTION charges_check_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT account_id FROM new_charges) n
               WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = n.account_id)) THEN
        RAISE foreign_key_violation USING MESSAGE = 'charges: account does not exist';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER charges_accounts_exist AFTER INSERT ON charges
    REFERENCING NEW TABLE AS new_charges
    FOR EACH STATEMENT EXECUTE FUNCTION charges_check_accounts();
