"""`billing migrate`: idempotent, safe to run concurrently, atomic per
migration, and loud about a database it cannot reach.

Each test migrates fresh databases of the stack's Postgres (CREATE DATABASE),
so that the first run really applies everything.
"""
import re
import subprocess
import time

BASE_TABLES = {"accounts", "api_keys", "ledger_entries", "charges", "usage_daily",
               "schema_migrations"}


def _fresh_db(stack, name):
    stack.psql(f"drop database if exists {name}")
    stack.psql(f"create database {name}")
    return re.sub(r"/[^/]+$", f"/{name}", stack.env["DATABASE_URL"])


def _psql(url, sql):
    p = subprocess.run(["psql", url, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def _migrate(stack, url, check=True):
    p = stack.run_billing("migrate", env={"DATABASE_URL": url}, check=False)
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _counts(p):
    m = re.search(r"migrations: (\d+) applied, (\d+) known", p.stdout)
    assert m, (p.stdout, p.stderr)
    return int(m.group(1)), int(m.group(2))


def _tables(url):
    out = _psql(url, "select tablename from pg_tables where schemaname = 'public' order by 1")
    return out.splitlines()


def _versions(url):
    return [int(v) for v in _psql(url, "select version from schema_migrations order by 1").split()]


def _schema(url):
    """The database's schema as pg_dump prints it, minus its random \\restrict key."""
    p = subprocess.run(["pg_dump", "--schema-only", url], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return [l for l in p.stdout.splitlines() if not l.startswith(("\\restrict", "\\unrestrict"))]


def test_migrate_twice_applies_nothing_the_second_time(stack):
    # The stack's database was migrated by the harness: nothing left to do.
    p = _migrate(stack, stack.env["DATABASE_URL"])
    applied, known = _counts(p)
    assert applied == 0 and known >= 1
    url = _fresh_db(stack, "mig_twice")
    first = _migrate(stack, url)
    assert _counts(first) == (known, known)
    tables = _tables(url)
    assert BASE_TABLES <= set(tables), tables
    schema = _schema(url)
    second = _migrate(stack, url)
    assert _counts(second) == (0, known)
    assert _tables(url) == tables
    versions = _versions(url)
    assert len(versions) == known and len(set(versions)) == known, versions
    assert versions == sorted(versions) and versions[0] == 1
    assert _schema(url) == schema
    names = _psql(url, "select name from schema_migrations order by version").split()
    assert names[0] == "001_ledger", names
    # 004: charge ids compare as bytes, whatever the database's collation.
    assert _psql(url, "select collation_name from information_schema.columns where "
                      "table_name = 'charges' and column_name = 'reservation_id'").strip() == "C"


def test_concurrent_migrations(stack):
    known = _counts(_migrate(stack, stack.env["DATABASE_URL"]))[1]
    for rnd in range(3):
        url = _fresh_db(stack, f"mig_conc{rnd}")
        env = dict(stack.env)
        env["DATABASE_URL"] = url
        procs = [subprocess.Popen([stack.bin("billing"), "migrate"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, (p.returncode, err)
            assert "Sanitizer" not in err and "runtime error" not in err, err
        applied = sorted(int(re.search(r"(\d+) applied", out).group(1)) for out, _ in outs)
        # One of them applied everything; the others found it done.
        assert applied == [0, 0, known], (rnd, applied, outs)
        assert _versions(url) == sorted(set(_versions(url))) and len(_versions(url)) == known
        assert BASE_TABLES <= set(_tables(url))
        # The database works: the ledger's constraints are in place.
        _psql(url, "insert into accounts (name) values ('x')")
        assert _psql(url, "select count(*) from accounts") == "1"


def test_bad_database_url(stack):
    cases = [
        ("postgresql://postgres@127.0.0.1:1/pointgate", None),
        (re.sub(r"/[^/]+$", "/no_such_db_here", stack.env["DATABASE_URL"]), "does not exist"),
        (stack.env["DATABASE_URL"].replace("postgres@", "no_such_role@"), "does not exist"),
        ("this is not a url = at all", None),
    ]
    for url, words in cases:
        t0 = time.time()
        p = _migrate(stack, url, check=False)
        assert p.returncode not in (0, 23), (url, p.returncode, p.stderr)
        assert time.time() - t0 < 30
        err = p.stderr.strip()
        assert err and ("postgres" in err.lower() or "migrate" in err.lower()), (url, err)
        if words:
            assert words in err, (url, err)
        assert "migrations:" not in p.stdout


def test_failed_migration_applies_nothing_of_it(stack):
    known = _counts(_migrate(stack, stack.env["DATABASE_URL"]))[1]
    url = _fresh_db(stack, "mig_fail")
    # A table in the way of the last statement of 001_ledger.
    _psql(url, "create table usage_daily (x int)")
    p = _migrate(stack, url, check=False)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "001_ledger" in p.stderr and "already exists" in p.stderr, p.stderr
    assert _tables(url) == ["schema_migrations", "usage_daily"], _tables(url)
    assert _versions(url) == []
    # Clear the way: now it applies, all of it.
    _psql(url, "drop table usage_daily")
    assert _counts(_migrate(stack, url)) == (known, known)
    assert BASE_TABLES <= set(_tables(url))
