-- 005_charges_late_outcome: a charge row may record a late settle.
--
-- A gateway that stops with settles it answered but could not deliver
-- (Redis away) spills them to disk and replays them at its next start
-- (settle.lua outcome "late"). If the sweeper had released such a hold
-- meanwhile, its row is (expire, 0); settlement then upgrades that row to
-- (late, the amount charged), once, moving accounts.spent and usage_daily
-- by the difference (ledger.c). A late record whose row does not exist yet
-- inserts it with outcome late.
--
-- The new rule admits every row the old one did. The migration runs in one
-- transaction, so VALIDATE still scans charges under the ALTER's exclusive
-- lock: on a large table run `billing migrate` in a quiet moment (as 004).
ALTER TABLE charges DROP CONSTRAINT charges_outcome_check;
ALTER TABLE charges ADD CONSTRAINT charges_outcome_check
    CHECK (outcome IN ('commit', 'release', 'expire', 'late')) NOT VALID;
ALTER TABLE charges VALIDATE CONSTRAINT charges_outcome_check;
