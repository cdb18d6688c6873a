/* fuzz_routesfile.c: the routes file parser (gateway/routes.c,
 * routes_load_buffer: the same code as routes_load without the file).
 *
 * Properties: a refused file leaves no table and says why; a loaded table
 * holds only routes the documentation allows: an id of 1..128 bytes with
 * no '|' and no leading '_' or '~', a method, a pattern whose "**" is last
 * and whose other segments are not empty (but for "/" alone), prices and
 * holds in [1, 2^40], a timeout in [1, 3600000] ms, billable classes among
 * 1xx..5xx, a units header on every usage route; matching the table never
 * fails; freeing it leaks nothing (LeakSanitizer). */
#include "gateway/routes.h"
#include "tests/fuzz/fuzz.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    route_table *t = NULL;
    char err[256] = "";
    const int64_t pmax = (int64_t)1 << 40;

    if (routes_load_buffer((const char *)data, size, "fuzz", 30000, &t, err, sizeof err) != 0) {
        FUZZ_CHECK(t == NULL);
        FUZZ_CHECK(err[0] != '\0');
        return 0;
    }
    FUZZ_CHECK(t != NULL && t->refs == 1);
    for (size_t i = 0; i < t->n; i++) {
        const route *r = &t->routes[i];
        size_t idlen = strlen(r->id);
        FUZZ_CHECK(idlen >= 1 && idlen <= 128 && !strchr(r->id, '|'));
        FUZZ_CHECK(r->id[0] != '_' && r->id[0] != '~');
        FUZZ_CHECK(r->method[0] != '\0');
        FUZZ_CHECK(r->nsegs >= 1);
        for (size_t k = 0; k < r->nsegs; k++) {
            FUZZ_CHECK(strcmp(r->segs[k], "**") != 0 || k == r->nsegs - 1);
            FUZZ_CHECK(!strchr(r->segs[k], '/'));
            FUZZ_CHECK(r->segs[k][0] != '\0' || k == r->nsegs - 1);
        }
        FUZZ_CHECK(r->price >= 1 && r->price <= pmax);
        FUZZ_CHECK(r->timeout_ms >= 1 && r->timeout_ms <= 3600000);
        FUZZ_CHECK((r->charge_on & ~0x3eu) == 0);
        FUZZ_CHECK(r->idempotency >= ROUTES_IDEM_OPTIONAL && r->idempotency <= ROUTES_IDEM_OFF);
        if (r->usage)
            FUZZ_CHECK(r->unit_price >= 1 && r->unit_price <= pmax && r->units_header &&
                       r->units_header[0]);
        else
            FUZZ_CHECK(r->unit_price == 0 && r->units_header == NULL);
        FUZZ_CHECK(routes_billable(r, 0) == 0 && routes_billable(r, 600) == 0);
    }
    routes_match(t, "GET", "/");
    routes_match(t, "GET", "/v1/devices/d1/status");
    routes_match(t, "POST", "/a/b/c/d/e/f/g");
    routes_unref(t);
    return 0;
}
