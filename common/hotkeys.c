/* hotkeys.c: key naming of the hot-balance layout (see hotkeys.h). */
#include "common/hotkeys.h"

#include <stdio.h>

void hot_keys_for(hot_keys *k, int64_t account_id)
{
    /* Writes (never reads) *k; cppcheck's cross-TU check misreads snprintf. */
    // cppcheck-suppress ctuuninitvar
    snprintf(k->acct, sizeof k->acct, "pg:{%lld}:acct", (long long)account_id);
    snprintf(k->holds, sizeof k->holds, "pg:{%lld}:holds", (long long)account_id);
    snprintf(k->lim, sizeof k->lim, "pg:{%lld}:lim", (long long)account_id);
}
