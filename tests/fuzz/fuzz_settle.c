/* fuzz_settle.c: settlement's outbox record parser (billing/settlement.c,
 * settle_parse: "rid|acct|route|amount|hold|outcome|status", the format
 * settle.lua and lease.lua write).
 *
 * Properties of a record that parses: every text part is non-empty, has
 * no '|' and fits its column; the account is positive, amount and hold are
 * not negative, the status is 0..999; and written back in settle.lua's
 * format it is the same string, so that a record is read one way only
 * (what Postgres keeps is what Redis held). The parser sees a
 * NUL-terminated copy of exactly the input (as hiredis hands it over). */
#include "billing/hot.h"
#include "billing/ledger.h"
#include "billing/workers.h"
#include "tests/fuzz/fuzz.h"

#include <inttypes.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *rec, back[512];
    ledger_charge c;
    size_t n = 0;

    /* A Redis string reaches the parser up to its first NUL. */
    while (n < size && data[n])
        n++;
    rec = malloc(n + 1);
    if (!rec) return 0;
    memcpy(rec, data, n);
    rec[n] = '\0';
    memset(&c, 0, sizeof c);
    if (settle_parse(rec, 1234, &c) == 0) {
        FUZZ_CHECK(c.rid[0] && !strchr(c.rid, '|') && strlen(c.rid) < sizeof c.rid);
        FUZZ_CHECK(c.route[0] && !strchr(c.route, '|') && strlen(c.route) < sizeof c.route);
        FUZZ_CHECK(c.outcome[0] && !strchr(c.outcome, '|'));
        FUZZ_CHECK(c.account_id > 0 && c.amount >= 0 && c.hold >= 0);
        FUZZ_CHECK(c.status >= 0 && c.status <= 999 && c.ts_ms == 1234);
        snprintf(back, sizeof back, "%s|%" PRId64 "|%s|%" PRId64 "|%" PRId64 "|%s|%d", c.rid,
                 c.account_id, c.route, c.amount, c.hold, c.outcome, c.status);
#ifndef FUZZ_SETTLE_LENIENT_INT
        FUZZ_CHECK(strcmp(back, rec) == 0);
#endif
    }
    free(rec);
    return 0;
}
