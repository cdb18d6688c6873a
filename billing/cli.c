/* cli.c: admin and finance subcommands (see cli.h). Output is a readable
 * table by default, JSON with --json; errors go to stderr, one line. */
#include "billing/cli.h"

#include "billing/alerts.h"
#include "billing/archive.h"
#include "billing/config.h"
#include "billing/control.h"
#include "common/env.h"
#include "billing/keys.h"
#include "billing/limits.h"
#include "billing/operators.h"
#include "billing/periods.h"
#include "billing/reports.h"
#include "billing/status.h"
#include "billing/webhooks.h"

#include <inttypes.h>
#include <jansson.h>
#include <pwd.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CLI_MAX_ARGS 8

/* Parsed command line: positionals and --flags (with or without a value). */
typedef struct cli_args {
    const char *pos[CLI_MAX_ARGS];
    int npos;
    const char *flag_name[CLI_MAX_ARGS];
    const char *flag_value[CLI_MAX_ARGS];
    int nflags;
    int help;
} cli_args;

/* VALUED lists the flags that take a value, BOOLS those that don't. */
static int cli_parse(int argc, char **argv, const char *valued, const char *bools, cli_args *a)
{
    memset(a, 0, sizeof *a);
    for (int i = 0; i < argc; i++) {
        const char *s = argv[i];
        char key[48];
        if (strcmp(s, "--help") == 0 || strcmp(s, "-h") == 0) {
            a->help = 1;
            continue;
        }
        if (strncmp(s, "--", 2) != 0) {
            if (a->npos == CLI_MAX_ARGS) return -1;
            a->pos[a->npos++] = s;
            continue;
        }
        if (a->nflags == CLI_MAX_ARGS || strlen(s) > 40) return -1;
        snprintf(key, sizeof key, " %s ", s + 2);
        a->flag_name[a->nflags] = s + 2;
        if (valued && strstr(valued, key)) {
            if (i + 1 >= argc) {
                fprintf(stderr, "billing: --%s needs a value\n", s + 2);
                return -1;
            }
            a->flag_value[a->nflags++] = argv[++i];
        } else if (bools && strstr(bools, key)) {
            a->flag_value[a->nflags++] = "";
        } else {
            fprintf(stderr, "billing: unknown option %s\n", s);
            return -1;
        }
    }
    return 0;
}

static const char *cli_flag(const cli_args *a, const char *name)
{
    for (int i = 0; i < a->nflags; i++)
        if (strcmp(a->flag_name[i], name) == 0) return a->flag_value[i];
    return NULL;
}

static int cli_id(const char *s, const char *what, int64_t *out)
{
    if (!s || env_parse_int64(s, out) != 0 || *out <= 0) {
        fprintf(stderr, "billing: %s must be a positive id, got '%s'\n", what, s ? s : "");
        return -1;
    }
    return 0;
}

static int cli_status(int rc, const char *what)
{
    switch (rc) {
    case LEDGER_OK:
        return CLI_OK;
    case LEDGER_NOT_FOUND:
        fprintf(stderr, "billing: %s not found\n", what);
        return CLI_NOT_FOUND;
    case LEDGER_CONFLICT:
        fprintf(stderr, "billing: refused: the reference was already used with other terms\n");
        return CLI_REFUSED;
    case LEDGER_INSUFFICIENT:
        fprintf(stderr, "billing: refused: the balance would go below zero\n");
        return CLI_REFUSED;
    case LEDGER_LIMIT:
        fprintf(stderr, "billing: refused: over the allowed limit\n");
        return CLI_REFUSED;
    case CONTROL_UNAVAILABLE:
        fprintf(stderr, "billing: redis is unreachable; the change may be incomplete, retry\n");
        return CLI_FAIL;
    default:
        fprintf(stderr, "billing: the ledger is unreachable or failed; retry\n");
        return CLI_FAIL;
    }
}

static void cli_print_json(json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2));
    if (s) printf("%s\n", s);
    free(s);
    json_decref(j);
}

/* Connections for one command; *operator records who made credit entries. */
typedef struct cli_env {
    billing_config cfg;
    control_ctx c;
    char operator_name[80];
} cli_env;

static int cli_open(cli_env *e, int need_pepper)
{
    const struct passwd *pw = getpwuid(getuid());
    const char *user = env_str("USER", pw ? pw->pw_name : "unknown");
    memset(e, 0, sizeof *e);
    if (config_load(&e->cfg, 1, 0, need_pepper) != 0) return CLI_USAGE;
    snprintf(e->operator_name, sizeof e->operator_name, "cli:%s", user);
    e->c.pepper = &e->cfg.pepper;
    e->c.pg = ledger_connect(e->cfg.database_url);
    e->c.hot = hot_open(e->cfg.redis_url);
    if (!e->c.pg || !e->c.hot) {
        fprintf(stderr, "billing: cannot reach the ledger (DATABASE_URL) or REDIS_URL is bad\n");
        return CLI_FAIL;
    }
    return CLI_OK;
}

static void cli_close(cli_env *e)
{
    if (e->c.pg) PQfinish(e->c.pg);
    hot_close(e->c.hot);
}

static void cli_print_account(control_ctx *c, const ledger_account *a)
{
    int found = 0;
    int64_t credited, spent, held;
    printf("id          %" PRId64 "\nname        %s\ncreated_at  %s\n", a->id, a->name,
           a->created_at);
    printf("credited    %" PRId64 "\nspent       %" PRId64 "\nbalance     %" PRId64 "\n",
           a->credited, a->spent, a->credited - a->spent);
    if (hot_account(c->hot, a->id, &found, &credited, &spent, &held) == 0 && found)
        printf("available   %" PRId64 "\nheld        %" PRId64 "\n", credited - spent - held, held);
    else
        printf("available   (redis unreachable or not synced)\n");
}

static int cli_accounts(int argc, char **argv)
{
    cli_args a;
    cli_env e;
    ledger_account acct;
    int rc;
    const char *sub = argc > 0 ? argv[0] : NULL;
    if (!sub || cli_parse(argc - 1, argv + 1, " after limit ", " json ", &a) != 0 || a.help ||
        (strcmp(sub, "create") == 0 && a.npos != 1) || (strcmp(sub, "show") == 0 && a.npos != 1) ||
        (strcmp(sub, "list") == 0 && a.npos != 0)) {
        fprintf(a.help ? stdout : stderr,
                "usage: billing accounts create NAME [--json]\n"
                "       billing accounts list [--after ID] [--limit N] [--json]\n"
                "       billing accounts show ID [--json]\n");
        return a.help && sub ? CLI_OK : CLI_USAGE;
    }
    if (strcmp(sub, "create") != 0 && strcmp(sub, "list") != 0 && strcmp(sub, "show") != 0) {
        fprintf(stderr, "billing: accounts: unknown subcommand '%s'\n", sub);
        return CLI_USAGE;
    }
    if (strcmp(sub, "create") == 0 && !ledger_valid_text(a.pos[0], 200)) {
        fprintf(stderr, "billing: NAME must be 1 to 200 characters\n");
        return CLI_USAGE;
    }
    if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
    if (strcmp(sub, "create") == 0) {
        rc = cli_status(control_account_create(&e.c, a.pos[0], &acct), "account");
        if (rc == CLI_OK) {
            if (cli_flag(&a, "json"))
                cli_print_json(
                    json_pack("{s:I, s:s}", "id", (json_int_t)acct.id, "name", acct.name));
            else
                printf("account %" PRId64 " created (%s)\n", acct.id, acct.name);
        }
    } else if (strcmp(sub, "show") == 0) {
        int64_t id;
        if (cli_id(a.pos[0], "ID", &id) != 0) {
            rc = CLI_USAGE;
            goto out;
        }
        rc = cli_status(ledger_account_get(e.c.pg, id, &acct), "account");
        if (rc == CLI_OK) cli_print_account(&e.c, &acct);
    } else {
        int64_t after = 0, limit = 100;
        const char *as = cli_flag(&a, "after"), *ls = cli_flag(&a, "limit");
        ledger_account *rows;
        int n = 0;
        if ((as && (env_parse_int64(as, &after) != 0 || after < 0)) ||
            (ls && (env_parse_int64(ls, &limit) != 0 || limit < 1 || limit > 10000))) {
            fprintf(stderr, "billing: --after is an id, --limit 1..10000\n");
            rc = CLI_USAGE;
            goto out;
        }
        rows = calloc((size_t)limit, sizeof *rows);
        rc = rows ? cli_status(ledger_accounts(e.c.pg, after, (int)limit, rows, &n), "accounts")
                  : CLI_FAIL;
        if (rc == CLI_OK) {
            printf("%-10s %-30s %14s %14s %14s\n", "ID", "NAME", "CREDITED", "SPENT", "BALANCE");
            for (int i = 0; i < n; i++)
                printf("%-10" PRId64 " %-30.30s %14" PRId64 " %14" PRId64 " %14" PRId64 "\n",
                       rows[i].id, rows[i].name, rows[i].credited, rows[i].spent,
                       rows[i].credited - rows[i].spent);
        }
        free(rows);
    }
out:
    cli_close(&e);
    return rc;
}

/* A key as keys_list shows it, in columns. */
static void cli_print_key(json_t *k)
{
    json_t *sc = json_object_get(k, "scopes");
    const char *name = json_string_value(json_object_get(k, "name"));
    const char *exp = json_string_value(json_object_get(k, "expires_at"));
    char scopes[KEYS_SCOPES_MAX * (KEYS_SCOPE_MAX + 1) + 1] = "";
    size_t i;
    json_t *e;
    json_array_foreach(sc, i, e)
    {
        if (i) strcat(scopes, ",");
        strcat(scopes, json_string_value(e));
    }
    printf("%-8" JSON_INTEGER_FORMAT " %-20s ...%-4s %-8s %-20s %s\n",
           json_integer_value(json_object_get(k, "key_id")), name ? name : "-",
           json_string_value(json_object_get(k, "hint"))
               ? json_string_value(json_object_get(k, "hint"))
               : "",
           json_string_value(json_object_get(k, "state")), exp ? exp : "never",
           scopes[0] ? scopes : "*");
}

/* A new or rotated key: its secret, shown once. */
static void cli_print_new_key(json_t *info, const char *key, int as_json)
{
    if (as_json) {
        json_object_set_new(info, "api_key", json_string(key));
        cli_print_json(json_incref(info));
        return;
    }
    printf("key_id  %" JSON_INTEGER_FORMAT "\napi_key %s\n(shown once: store it now)\n",
           json_integer_value(json_object_get(info, "key_id")), key);
}

static int cli_keys(int argc, char **argv)
{
    cli_args a;
    cli_env e;
    int64_t id;
    char key[APIKEY_LEN + 1], scopes_buf[KEYS_SCOPES_MAX * (KEYS_SCOPE_MAX + 1) + 1];
    json_t *info = NULL;
    keys_spec spec;
    const char *bad;
    int rc, as_json;
    const char *sub = argc > 0 ? argv[0] : NULL;
    memset(&e, 0, sizeof e);
    if (!sub ||
        cli_parse(argc - 1, argv + 1, " name expires-at scopes grace after limit ", " json ", &a) !=
            0 ||
        a.help || a.npos != 1 ||
        (strcmp(sub, "create") != 0 && strcmp(sub, "revoke") != 0 && strcmp(sub, "list") != 0 &&
         strcmp(sub, "rotate") != 0)) {
        fprintf(a.help ? stdout : stderr,
                "usage: billing keys create ACCOUNT_ID [--name NAME] [--expires-at "
                "YYYY-MM-DDTHH:MM:SSZ]\n"
                "                           [--scopes ROUTE,ROUTE...] [--json]\n"
                "       billing keys list ACCOUNT_ID [--after KEY_ID] [--limit N] [--json]\n"
                "       billing keys rotate KEY_ID [--grace SECONDS] [--json]\n"
                "       billing keys revoke KEY_ID\n");
        return a.help && sub ? CLI_OK : CLI_USAGE;
    }
    as_json = cli_flag(&a, "json") != NULL;
    if (cli_id(a.pos[0],
               strcmp(sub, "create") == 0 || strcmp(sub, "list") == 0 ? "ACCOUNT_ID" : "KEY_ID",
               &id) != 0)
        return CLI_USAGE;
    if (strcmp(sub, "create") == 0) {
        const char *sc = cli_flag(&a, "scopes");
        memset(&spec, 0, sizeof spec);
        spec.name = cli_flag(&a, "name");
        spec.expires_at = cli_flag(&a, "expires-at");
        if (sc) {
            if (strlen(sc) >= sizeof scopes_buf) {
                fprintf(stderr, "billing: --scopes is too long\n");
                return CLI_USAGE;
            }
            snprintf(scopes_buf, sizeof scopes_buf, "%s", sc);
            for (char *p = scopes_buf, *q; p; p = q) {
                q = strchr(p, ',');
                if (q) *q++ = '\0';
                if (spec.nscopes == KEYS_SCOPES_MAX) {
                    spec.nscopes++;
                    break;
                }
                spec.scopes[spec.nscopes++] = p;
            }
        }
        if ((bad = keys_check(&spec))) {
            fprintf(stderr, "billing: %s\n", bad);
            return CLI_USAGE;
        }
    }
    if ((rc = cli_open(&e, strcmp(sub, "create") == 0 || strcmp(sub, "rotate") == 0)) != CLI_OK)
        goto out;
    if (strcmp(sub, "create") == 0) {
        rc = cli_status(keys_create(&e.c, id, &spec, key, &info), "account");
        if (rc == CLI_OK) cli_print_new_key(info, key, as_json);
    } else if (strcmp(sub, "rotate") == 0) {
        int64_t grace = KEYS_GRACE_DEFAULT_S;
        const char *g = cli_flag(&a, "grace");
        if (g && (env_parse_int64(g, &grace) != 0 || grace < 0 || grace > KEYS_GRACE_MAX_S)) {
            fprintf(stderr, "billing: --grace is 0 to 2592000 seconds\n");
            rc = CLI_USAGE;
            goto out;
        }
        rc = keys_rotate(&e.c, id, grace, key, &info);
        if (rc == LEDGER_CONFLICT) {
            fprintf(stderr, "billing: key %" PRId64 " was rotated already: rotate its successor\n",
                    id);
            rc = CLI_REFUSED;
        } else if ((rc = cli_status(rc, "live key")) == CLI_OK) {
            cli_print_new_key(info, key, as_json);
            if (!as_json) printf("key %" PRId64 " keeps working for %" PRId64 " s\n", id, grace);
        }
    } else if (strcmp(sub, "list") == 0) {
        int64_t after = 0, limit = 100;
        const char *as = cli_flag(&a, "after"), *ls = cli_flag(&a, "limit");
        json_t *keys = NULL;
        if ((as && (env_parse_int64(as, &after) != 0 || after < 0)) ||
            (ls && (env_parse_int64(ls, &limit) != 0 || limit < 1 || limit > KEYS_LIST_MAX))) {
            fprintf(stderr, "billing: --after is a key id, --limit 1 to 1000\n");
            rc = CLI_USAGE;
            goto out;
        }
        rc = cli_status(keys_list(e.c.pg, id, after, (int)limit, &keys), "account");
        if (rc == CLI_OK && as_json) {
            cli_print_json(keys);
        } else if (rc == CLI_OK) {
            size_t i;
            json_t *k;
            printf("%-8s %-20s %-7s %-8s %-20s %s\n", "KEY_ID", "NAME", "HINT", "STATE", "EXPIRES",
                   "SCOPES");
            json_array_foreach(keys, i, k)
            {
                cli_print_key(k);
            }
            json_decref(keys);
        }
    } else {
        rc = cli_status(keys_revoke(&e.c, id), "key");
        if (rc == CLI_OK) printf("key %" PRId64 " revoked\n", id);
    }
out:
    sodium_memzero(key, sizeof key);
    json_decref(info);
    cli_close(&e);
    return rc;
}

static int cli_credit(int argc, char **argv, int is_topup)
{
    cli_args a;
    cli_env e;
    int64_t account, amount;
    ledger_entry entry;
    int created = 0, rc;
    const char *ref, *reason;
    if (cli_parse(argc, argv, " reference reason ", " json ", &a) != 0 || a.help || a.npos != 2) {
        fprintf(a.help ? stdout : stderr,
                is_topup ? "usage: billing topup ACCOUNT_ID AMOUNT --reference REF [--json]\n"
                         : "usage: billing adjust ACCOUNT_ID AMOUNT --reason TEXT "
                           "[--reference REF] [--json]\n");
        return a.help ? CLI_OK : CLI_USAGE;
    }
    ref = cli_flag(&a, "reference");
    reason = cli_flag(&a, "reason");
    if (cli_id(a.pos[0], "ACCOUNT_ID", &account) != 0) return CLI_USAGE;
    if (env_parse_int64(a.pos[1], &amount) != 0 || amount == 0 || amount > LEDGER_MAX_AMOUNT ||
        amount < -LEDGER_MAX_AMOUNT || (is_topup && amount < 0)) {
        fprintf(stderr, "billing: AMOUNT must be an integer, %s, at most 10^12 in size\n",
                is_topup ? "positive" : "non-zero");
        return CLI_USAGE;
    }
    if ((is_topup && !ref) || (!is_topup && !ledger_valid_text(reason, 500)) ||
        (ref && !ledger_valid_text(ref, 200))) {
        fprintf(stderr, is_topup ? "billing: --reference (1-200 characters) is required\n"
                                 : "billing: --reason (1-500 characters) is required\n");
        return CLI_USAGE;
    }
    if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
    rc = cli_status(control_credit(&e.c, account, is_topup ? "topup" : "adjustment", amount, ref,
                                   is_topup ? NULL : reason, e.operator_name, &entry, &created),
                    "account");
    if (rc == CLI_OK) {
        if (cli_flag(&a, "json"))
            cli_print_json(json_pack("{s:I, s:I, s:I, s:b}", "id", (json_int_t)entry.id, "amount",
                                     (json_int_t)entry.amount, "credited_after",
                                     (json_int_t)entry.credited_after, "created", created));
        else
            printf("%s entry %" PRId64 ": %+" PRId64 " points, credited now %" PRId64 "%s\n",
                   entry.kind, entry.id, entry.amount, entry.credited_after,
                   created ? "" : " (already recorded: nothing added)");
    }
out:
    cli_close(&e);
    return rc;
}

static int cli_report(int argc, char **argv)
{
    cli_args a;
    cli_env e;
    int rc, mask = 0;
    const char *sub = argc > 0 ? argv[0] : NULL;
    if (!sub ||
        cli_parse(argc - 1, argv + 1, " from to group-by account ", " csv json ", &a) != 0 ||
        a.help || (strcmp(sub, "usage") != 0 && strcmp(sub, "statement") != 0)) {
        fprintf(a.help ? stdout : stderr,
                "usage: billing report usage --from YYYY-MM-DD --to YYYY-MM-DD "
                "[--group-by account,route,day] [--account ID] [--csv|--json]\n"
                "       billing report statement ACCOUNT_ID YYYY-MM [--json]\n");
        return a.help && sub ? CLI_OK : CLI_USAGE;
    }
    if (strcmp(sub, "usage") == 0) {
        const char *from = cli_flag(&a, "from"), *to = cli_flag(&a, "to");
        const char *accts = cli_flag(&a, "account");
        int64_t account = 0;
        report_usage u;
        if (a.npos != 0 || calendar_valid_date(from) != 0 || calendar_valid_date(to) != 0 ||
            strcmp(from, to) >= 0) {
            fprintf(stderr, "billing: --from and --to must be dates YYYY-MM-DD, from < to\n");
            return CLI_USAGE;
        }
        if (reports_parse_group_by(cli_flag(&a, "group-by"), &mask) != 0) {
            fprintf(stderr, "billing: --group-by is a list of account, route, day\n");
            return CLI_USAGE;
        }
        if (accts && cli_id(accts, "--account", &account) != 0) return CLI_USAGE;
        if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
        rc = cli_status(reports_usage(e.c.pg, from, to, mask, account, &u), "report");
        if (rc != CLI_OK) goto out;
        if (cli_flag(&a, "csv")) {
            char *csv = reports_usage_csv(&u);
            if (csv)
                fputs(csv, stdout);
            else
                rc = CLI_FAIL;
            free(csv);
        } else if (cli_flag(&a, "json")) {
            cli_print_json(reports_usage_json(&u));
        } else {
            printf("%-10s %-24s %-10s %12s %14s %12s\n", "ACCOUNT", "ROUTE", "DAY", "CALLS",
                   "POINTS", "FAILED");
            for (int i = 0; i <= u.nrows; i++) {
                const report_row *r = i < u.nrows ? &u.rows[i] : &u.totals;
                char acct[24] = "*";
                if (i < u.nrows && (mask & REPORT_BY_ACCOUNT))
                    snprintf(acct, sizeof acct, "%" PRId64, r->account_id);
                if (i == u.nrows) snprintf(acct, sizeof acct, "TOTAL");
                printf("%-10s %-24.24s %-10s %12" PRId64 " %14" PRId64 " %12" PRId64 "\n", acct,
                       i < u.nrows && (mask & REPORT_BY_ROUTE) ? r->route : "*",
                       i < u.nrows && (mask & REPORT_BY_DAY) ? r->day : "*", r->calls, r->points,
                       r->failed_calls);
            }
        }
        reports_usage_free(&u);
    } else {
        int64_t account;
        char next[8];
        report_statement st;
        if (a.npos != 2 || cli_id(a.pos[0], "ACCOUNT_ID", &account) != 0 ||
            calendar_valid_month(a.pos[1], next) != 0) {
            fprintf(stderr, "billing: usage: report statement ACCOUNT_ID YYYY-MM\n");
            return CLI_USAGE;
        }
        if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
        rc = cli_status(reports_statement(e.c.pg, account, a.pos[1], &st), "account");
        if (rc != CLI_OK) goto out;
        if (cli_flag(&a, "json")) {
            cli_print_json(reports_statement_json(&st));
        } else {
            printf("statement of account %" PRId64 " for %s (UTC)\n\n", account, st.month);
            printf("  opening balance %16" PRId64 "\n", st.opening);
            for (int i = 0; i < st.nentries; i++)
                printf("  %-10s %s %+14" PRId64 "  %s\n", st.entries[i].kind,
                       st.entries[i].created_at, st.entries[i].amount,
                       st.entries[i].reference[0] ? st.entries[i].reference : st.entries[i].reason);
            printf("  credits         %+16" PRId64 "\n", st.credits);
            for (int i = 0; i < st.nroutes; i++)
                printf("  %-24.24s %8" PRId64 " calls %+14" PRId64 "\n", st.routes[i].route,
                       st.routes[i].calls, -st.routes[i].points);
            printf("  charges         %+16" PRId64 "\n", -st.charges);
            printf("  closing balance %16" PRId64 "\n", st.closing);
        }
        reports_statement_free(&st);
    }
out:
    cli_close(&e);
    return rc;
}

static int cli_operators(int argc, char **argv)
{
    cli_args a;
    cli_env e;
    int rc;
    const char *sub = argc > 0 ? argv[0] : NULL;
    char token[APIKEY_LEN + 1];
    if (!sub || cli_parse(argc - 1, argv + 1, " role ", NULL, &a) != 0 || a.help ||
        (strcmp(sub, "add") == 0 && a.npos != 1) || (strcmp(sub, "revoke") == 0 && a.npos != 1) ||
        (strcmp(sub, "list") == 0 && a.npos != 0) ||
        (strcmp(sub, "add") != 0 && strcmp(sub, "revoke") != 0 && strcmp(sub, "list") != 0)) {
        fprintf(a.help ? stdout : stderr, "usage: billing operators add NAME --role admin|finance\n"
                                          "       billing operators revoke NAME\n"
                                          "       billing operators list\n");
        return a.help && sub ? CLI_OK : CLI_USAGE;
    }
    if (strcmp(sub, "list") != 0 && operators_valid_name(a.pos[0]) != 0) {
        fprintf(stderr,
                "billing: NAME is 1-64 of a-z 0-9 . _ - (starting with a letter or digit)\n");
        return CLI_USAGE;
    }
    if (strcmp(sub, "add") == 0) {
        const char *role = cli_flag(&a, "role");
        if (!role || (strcmp(role, "admin") != 0 && strcmp(role, "finance") != 0)) {
            fprintf(stderr, "billing: --role admin|finance is required\n");
            return CLI_USAGE;
        }
        if ((rc = cli_open(&e, 1)) != CLI_OK) goto out;
        rc = operators_add(e.c.pg, &e.cfg.pepper, a.pos[0], role, token);
        if (rc == LEDGER_CONFLICT) {
            fprintf(stderr, "billing: an operator named %s already exists\n", a.pos[0]);
            rc = CLI_REFUSED;
        } else if ((rc = cli_status(rc, "operator")) == CLI_OK) {
            printf("operator %s (%s)\ntoken %s\n(shown once: store it now)\n", a.pos[0], role,
                   token);
        }
        sodium_memzero(token, sizeof token);
    } else if (strcmp(sub, "revoke") == 0) {
        if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
        rc = cli_status(operators_revoke(e.c.pg, a.pos[0]), "live operator");
        if (rc == CLI_OK) printf("operator %s revoked\n", a.pos[0]);
    } else {
        operator_info *ops = NULL;
        int n = 0;
        if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
        rc = cli_status(operators_list(e.c.pg, &ops, &n), "operators");
        if (rc == CLI_OK) {
            printf("%-24s %-8s %-22s %s\n", "NAME", "ROLE", "CREATED", "STATE");
            for (int i = 0; i < n; i++)
                printf("%-24s %-8s %-22s %s\n", ops[i].name, ops[i].role, ops[i].created_at,
                       ops[i].revoked ? "revoked" : "active");
        }
        free(ops);
    }
out:
    cli_close(&e);
    return rc;
}

/* --rate Q/S, --daily-cap N, --monthly-cap N ("none" clears) into BODY,
 * the settings JSON that limits_parse then checks: one set of rules for
 * the CLI and the API. */
static const char *cli_limits_flags(const cli_args *a, json_t *body)
{
    const char *rate = cli_flag(a, "rate"), *dc = cli_flag(a, "daily-cap"),
               *mc = cli_flag(a, "monthly-cap");
    const char *flags[2] = {dc, mc}, *names[2] = {"daily_cap", "monthly_cap"};
    if (!rate && !dc && !mc) return "say what to set: --rate, --daily-cap, --monthly-cap";
    if (rate && strcmp(rate, "none") == 0) {
        json_object_set_new(body, "rate", json_null());
    } else if (rate) {
        const char *slash = strchr(rate, '/');
        char q[24];
        int64_t quota, window;
        if (!slash || (size_t)(slash - rate) >= sizeof q)
            return "--rate is QUOTA/SECONDS, e.g. 10/1";
        memcpy(q, rate, (size_t)(slash - rate));
        q[slash - rate] = '\0';
        if (env_parse_int64(q, &quota) != 0 || env_parse_int64(slash + 1, &window) != 0)
            return "--rate is QUOTA/SECONDS, e.g. 10/1";
        json_object_set_new(
            body, "rate",
            json_pack("{s:I, s:I}", "quota", (json_int_t)quota, "window_s", (json_int_t)window));
    }
    for (int i = 0; i < 2; i++) {
        int64_t v;
        if (!flags[i]) continue;
        if (strcmp(flags[i], "none") == 0) {
            json_object_set_new(body, names[i], json_null());
            continue;
        }
        if (env_parse_int64(flags[i], &v) != 0) return "a cap is a whole number of points, or none";
        json_object_set_new(body, names[i], json_integer((json_int_t)v));
    }
    return NULL;
}

static void cli_print_limits(const limits_spec *s)
{
    if (s->rate_quota)
        printf("rate         %" PRId64 " calls per %" PRId64 " s\n", s->rate_quota,
               s->rate_window_s);
    else
        printf("rate         none\n");
    if (s->daily_cap)
        printf("daily_cap    %" PRId64 " points\n", s->daily_cap);
    else
        printf("daily_cap    none\n");
    if (s->monthly_cap)
        printf("monthly_cap  %" PRId64 " points\n", s->monthly_cap);
    else
        printf("monthly_cap  none\n");
}

/* billing limits show|set: the settings of one account or key. set
 * changes only the settings it names (the API's PUT replaces them all). */
static int cli_limits(int argc, char **argv)
{
    cli_args a;
    cli_env e;
    limits_spec cur, next;
    int64_t id, account = 0;
    enum limits_scope scope;
    const char *sub = argc > 0 ? argv[0] : NULL, *acct, *key, *bad = NULL;
    json_t *body = NULL;
    int rc, pushed = 0;
    memset(&e, 0, sizeof e);
    if (!sub ||
        cli_parse(argc - 1, argv + 1, " account key rate daily-cap monthly-cap ", " json ", &a) !=
            0 ||
        a.help || a.npos != 0 || (strcmp(sub, "show") != 0 && strcmp(sub, "set") != 0)) {
        fprintf(a.help ? stdout : stderr,
                "usage: billing limits show --account ID | --key ID [--json]\n"
                "       billing limits set --account ID | --key ID [--rate QUOTA/SECONDS|none]\n"
                "                          [--daily-cap POINTS|none] [--monthly-cap POINTS|none] "
                "[--json]\n");
        return a.help && sub ? CLI_OK : CLI_USAGE;
    }
    acct = cli_flag(&a, "account");
    key = cli_flag(&a, "key");
    if (!acct == !key) {
        fprintf(stderr, "billing: give one of --account ID and --key ID\n");
        return CLI_USAGE;
    }
    scope = acct ? LIMITS_ACCOUNT : LIMITS_KEY;
    if (cli_id(acct ? acct : key, acct ? "--account" : "--key", &id) != 0) return CLI_USAGE;
    if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
    rc = cli_status(limits_get(e.c.pg, scope, id, &cur, &account), acct ? "account" : "key");
    if (rc != CLI_OK) goto out;
    next = cur;
    if (strcmp(sub, "set") == 0) {
        body = limits_json(&cur);
        if (!body) {
            rc = CLI_FAIL;
            goto out;
        }
        bad = cli_limits_flags(&a, body);
        if (!bad) bad = limits_parse(body, &next);
        if (bad) {
            fprintf(stderr, "billing: %s\n", bad);
            rc = CLI_USAGE;
            goto out;
        }
        rc = cli_status(limits_set(&e.c, scope, id, &next, &account, &pushed),
                        acct ? "account" : "live key");
        if (rc != CLI_OK) goto out;
        if (!pushed)
            fprintf(stderr, "billing: stored; redis did not take it yet (the repair pass will)\n");
    }
    if (cli_flag(&a, "json")) {
        json_t *j = limits_json(&next);
        if (j) json_object_set_new(j, "account_id", json_integer((json_int_t)account));
        if (j && scope == LIMITS_KEY)
            json_object_set_new(j, "key_id", json_integer((json_int_t)id));
        cli_print_json(j);
    } else {
        printf("%-12s %" PRId64 "\n", scope == LIMITS_ACCOUNT ? "account" : "key", id);
        cli_print_limits(&next);
    }
out:
    json_decref(body);
    cli_close(&e);
    return rc;
}

/* An answer of the webhook and alert calls (webhooks.h: an HTTP status and
 * a JSON body, shared with the admin API): the body on stdout, or its
 * message on stderr with the exit code of its kind. */
static int cli_answer(int status, json_t *j)
{
    if (status < 300) {
        if (j) cli_print_json(j);
        return CLI_OK;
    }
    fprintf(stderr, "billing: %s\n",
            j && json_string_value(json_object_get(j, "message"))
                ? json_string_value(json_object_get(j, "message"))
                : "refused");
    json_decref(j);
    if (status == 404) return CLI_NOT_FOUND;
    if (status == 400) return CLI_USAGE;
    return status >= 500 ? CLI_FAIL : CLI_REFUSED;
}

static int cli_webhooks_usage(int help)
{
    fprintf(help ? stdout : stderr,
            "usage: billing webhooks add ACCOUNT_ID URL [--disabled]\n"
            "       billing webhooks list ACCOUNT_ID\n"
            "       billing webhooks remove ENDPOINT_ID\n"
            "       billing webhooks deliveries ENDPOINT_ID [--limit N] [--before DELIVERY_ID]\n"
            "       billing webhooks replay EVENT_ID\n"
            "add prints the endpoint with its signing secret: the only time it is shown.\n"
            "Answers are JSON.\n");
    return help ? CLI_OK : CLI_USAGE;
}

static int cli_webhooks(int argc, char **argv)
{
    cli_args a;
    cli_env e;
    const char *sub = argc > 0 ? argv[0] : NULL;
    json_t *out = NULL, *body = NULL;
    char *text = NULL;
    int64_t id = 0;
    int rc, status;
    memset(&e, 0, sizeof e);
    memset(&a, 0, sizeof a);
    if (!sub || cli_parse(argc - 1, argv + 1, " limit before ", " disabled ", &a) != 0 || a.help)
        return cli_webhooks_usage(a.help && sub);
    if (strcmp(sub, "add") == 0 && a.npos == 2) {
        if (cli_id(a.pos[0], "ACCOUNT_ID", &id) != 0) return CLI_USAGE;
        body = json_pack("{s:s, s:b}", "url", a.pos[1], "enabled", !cli_flag(&a, "disabled"));
        text = body ? json_dumps(body, JSON_COMPACT) : NULL;
        json_decref(body);
        if (!text) return CLI_FAIL;
    } else if (strcmp(sub, "replay") == 0 && a.npos == 1) {
        /* the event id is checked by the call */
    } else if ((strcmp(sub, "list") == 0 || strcmp(sub, "remove") == 0 ||
                strcmp(sub, "deliveries") == 0) &&
               a.npos == 1) {
        if (cli_id(a.pos[0], strcmp(sub, "list") == 0 ? "ACCOUNT_ID" : "ENDPOINT_ID", &id) != 0)
            return CLI_USAGE;
    } else {
        return cli_webhooks_usage(0);
    }
    if ((rc = cli_open(&e, strcmp(sub, "add") == 0)) != CLI_OK) goto out;
    if (strcmp(sub, "add") == 0)
        status = webhooks_api_create(&e.c, id, text, strlen(text), &out);
    else if (strcmp(sub, "list") == 0)
        status = webhooks_api_list(&e.c, id, &out);
    else if (strcmp(sub, "remove") == 0)
        status = webhooks_api_remove(&e.c, id, &out);
    else if (strcmp(sub, "deliveries") == 0)
        status =
            webhooks_api_deliveries(&e.c, id, cli_flag(&a, "limit"), cli_flag(&a, "before"), &out);
    else
        status = webhooks_api_replay(&e.c, a.pos[0], strlen(a.pos[0]), &out);
    if (status == 204) printf("removed\n");
    rc = cli_answer(status, out);
out:
    if (text) {
        sodium_memzero(text, strlen(text));
        free(text);
    }
    cli_close(&e);
    return rc;
}

/* "1000,100" as a JSON array of integers; NULL if it is not one. */
static json_t *cli_int_list(const char *s)
{
    json_t *arr = json_array();
    char buf[512], *save = NULL;
    if (!arr || strlen(s) >= sizeof buf) goto bad;
    snprintf(buf, sizeof buf, "%s", s);
    for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int64_t v;
        if (env_parse_int64(t, &v) != 0) goto bad;
        json_array_append_new(arr, json_integer((json_int_t)v));
    }
    return arr;
bad:
    json_decref(arr);
    return NULL;
}

static int cli_alerts(int argc, char **argv)
{
    cli_args a;
    cli_env e;
    const char *sub = argc > 0 ? argv[0] : NULL, *th, *eb;
    json_t *out = NULL, *body = NULL, *list;
    char *text = NULL;
    int64_t id = 0, ebv;
    int rc, is_set = sub && strcmp(sub, "set") == 0;
    memset(&e, 0, sizeof e);
    memset(&a, 0, sizeof a);
    if (!sub || cli_parse(argc - 1, argv + 1, " thresholds exhausted-below ", NULL, &a) != 0 ||
        a.help || a.npos != 1 || (!is_set && strcmp(sub, "show") != 0)) {
        fprintf(a.help && sub ? stdout : stderr,
                "usage: billing alerts show ACCOUNT_ID\n"
                "       billing alerts set ACCOUNT_ID --thresholds P[,P...] "
                "[--exhausted-below P]\n"
                "balance.low fires once when the balance falls below a threshold, and is armed\n"
                "again by a credit that lifts it back; --thresholds '' removes them all.\n");
        return a.help && sub ? CLI_OK : CLI_USAGE;
    }
    if (cli_id(a.pos[0], "ACCOUNT_ID", &id) != 0) return CLI_USAGE;
    if (is_set) {
        th = cli_flag(&a, "thresholds");
        eb = cli_flag(&a, "exhausted-below");
        if (!th) {
            fprintf(stderr, "billing: alerts set needs --thresholds P[,P...]\n");
            return CLI_USAGE;
        }
        list = cli_int_list(th);
        if (!list) {
            fprintf(stderr, "billing: --thresholds is a comma-separated list of points\n");
            return CLI_USAGE;
        }
        body = json_pack("{s:o}", "thresholds", list);
        if (body && eb) {
            if (env_parse_int64(eb, &ebv) != 0) {
                fprintf(stderr, "billing: --exhausted-below is a number of points\n");
                json_decref(body);
                return CLI_USAGE;
            }
            json_object_set_new(body, "exhausted_below", json_integer((json_int_t)ebv));
        }
        text = body ? json_dumps(body, JSON_COMPACT) : NULL;
        json_decref(body);
        if (!text) return CLI_FAIL;
    }
    if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
    rc = is_set ? alerts_api_put(&e.c, id, text, strlen(text), &out)
                : alerts_api_get(&e.c, id, &out);
    rc = cli_answer(rc, out);
out:
    free(text);
    cli_close(&e);
    return rc;
}

/* billing charge REQUEST_ID: the admin API's GET /v1/charges/{id}. */
static int cli_charge(int argc, char **argv)
{
    cli_env e;
    json_t *out = NULL;
    int rc;
    if (argc != 1 || strcmp(argv[0], "--help") == 0) {
        fprintf(argc == 1 ? stdout : stderr,
                "usage: billing charge REQUEST_ID\n"
                "The charge of one call (its X-Request-Id), or the archive file that holds\n"
                "its day once the day is past CHARGE_RETENTION_DAYS.\n");
        return argc == 1 ? CLI_OK : CLI_USAGE;
    }
    if ((rc = cli_open(&e, 0)) == CLI_OK) {
        rc = archive_api_charge(e.c.pg, argv[0], strlen(argv[0]), &out);
        rc = cli_answer(rc, out);
    }
    cli_close(&e);
    return rc;
}

/* billing archive list [--json] | run */
static int cli_archive(int argc, char **argv)
{
    cli_env e;
    cli_args a;
    const char *sub = argc > 0 ? argv[0] : NULL;
    json_t *list, *parts;
    archive_result res;
    int rc;
    memset(&a, 0, sizeof a);
    if (!sub || cli_parse(argc - 1, argv + 1, NULL, " json ", &a) != 0 || a.help || a.npos != 0 ||
        (strcmp(sub, "list") != 0 && strcmp(sub, "run") != 0)) {
        fprintf(a.help && sub ? stdout : stderr,
                "usage: billing archive list [--json]\n"
                "       billing archive run\n"
                "list: the charges table's daily partitions and what was exported (file, rows,\n"
                "bytes, sha256). run: one pass now (partitions ahead, months due closed, days\n"
                "past CHARGE_RETENTION_DAYS exported to ARCHIVE_DIR and dropped).\n");
        return a.help && sub ? CLI_OK : CLI_USAGE;
    }
    if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
    if (strcmp(sub, "run") == 0) {
        if (archive_pass(e.c.pg, &e.cfg, NULL, &res) != 0) {
            fprintf(stderr, "billing: the archive pass failed (see the log); what it did stays\n");
            rc = CLI_FAIL;
            goto out;
        }
        if (res.busy) printf("another billing process is archiving: nothing exported now\n");
        printf("partitions made %d, months closed %d, partitions archived %d (%" PRId64 " rows)\n",
               res.made, res.closed, res.archived, res.rows);
        if (!e.cfg.archive_dir) printf("ARCHIVE_DIR is not set: nothing is ever dropped\n");
        goto out;
    }
    list = archive_list(e.c.pg, &e.cfg);
    if (!list) {
        rc = cli_status(LEDGER_ERROR, "");
        goto out;
    }
    if (cli_flag(&a, "json")) {
        cli_print_json(list);
        goto out;
    }
    parts = json_object_get(list, "partitions");
    printf("retention %" PRId64 " days, archive dir %s\n", e.cfg.charge_retention_days,
           e.cfg.archive_dir ? e.cfg.archive_dir : "(not set: nothing is dropped)");
    printf("%-12s %-12s %-18s %-9s %12s %12s  %s\n", "from", "to", "partition", "state", "rows",
           "bytes", "file");
    for (size_t i = 0; i < json_array_size(parts); i++) {
        json_t *p = json_array_get(parts, i);
        printf("%-12s %-12s %-18s %-9s %12" JSON_INTEGER_FORMAT " %12" JSON_INTEGER_FORMAT "  %s\n",
               json_string_value(json_object_get(p, "from")),
               json_string_value(json_object_get(p, "to")),
               json_string_value(json_object_get(p, "name")),
               json_string_value(json_object_get(p, "state")),
               json_integer_value(json_object_get(p, "rows")),
               json_integer_value(json_object_get(p, "bytes")),
               json_object_get(p, "file") ? json_string_value(json_object_get(p, "file")) : "");
    }
    json_decref(list);
out:
    cli_close(&e);
    return rc;
}

/* billing period close YYYY-MM | list */
static int cli_period(int argc, char **argv)
{
    cli_env e;
    json_t *out = NULL;
    int rc, is_close = argc == 2 && strcmp(argv[0], "close") == 0;
    if (!is_close && !(argc == 1 && strcmp(argv[0], "list") == 0)) {
        int help = argc >= 1 && strcmp(argv[argc - 1], "--help") == 0;
        fprintf(help ? stdout : stderr,
                "usage: billing period close YYYY-MM\n"
                "       billing period list\n"
                "A closed month's statements never change: a charge settled later for one of\n"
                "its calls is booked on the day it is settled. Closing a month closes every\n"
                "month before it; billing closes one STATEMENT_CLOSE_DAYS after its end.\n");
        return help ? CLI_OK : CLI_USAGE;
    }
    if ((rc = cli_open(&e, 0)) != CLI_OK) goto out;
    rc = is_close ? periods_api_close(e.c.pg, argv[1], strlen(argv[1]), e.operator_name, &out)
                  : periods_api_list(e.c.pg, &out);
    rc = cli_answer(rc, out);
out:
    cli_close(&e);
    return rc;
}

int cli_run(int argc, char **argv)
{
    const char *cmd = argv[0];
    if (strcmp(cmd, "accounts") == 0) return cli_accounts(argc - 1, argv + 1);
    if (strcmp(cmd, "keys") == 0) return cli_keys(argc - 1, argv + 1);
    if (strcmp(cmd, "topup") == 0) return cli_credit(argc - 1, argv + 1, 1);
    if (strcmp(cmd, "adjust") == 0) return cli_credit(argc - 1, argv + 1, 0);
    if (strcmp(cmd, "report") == 0) return cli_report(argc - 1, argv + 1);
    if (strcmp(cmd, "operators") == 0) return cli_operators(argc - 1, argv + 1);
    if (strcmp(cmd, "status") == 0) return status_cli(argc - 1, argv + 1);
    if (strcmp(cmd, "limits") == 0) return cli_limits(argc - 1, argv + 1);
    if (strcmp(cmd, "webhooks") == 0) return cli_webhooks(argc - 1, argv + 1);
    if (strcmp(cmd, "alerts") == 0) return cli_alerts(argc - 1, argv + 1);
    if (strcmp(cmd, "charge") == 0) return cli_charge(argc - 1, argv + 1);
    if (strcmp(cmd, "archive") == 0) return cli_archive(argc - 1, argv + 1);
    if (strcmp(cmd, "period") == 0) return cli_period(argc - 1, argv + 1);
    return -1;
}
