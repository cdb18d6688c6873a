/* check.h: the unit tests' one assertion. CHECK(cond) reports a failed
 * condition with its place and counts it in `failures`, so a test runs all
 * its checks and exits non-zero if any failed. For tests/unit/test_*.c only. */
#ifndef TESTS_UNIT_CHECK_H
#define TESTS_UNIT_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);               \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

#endif
