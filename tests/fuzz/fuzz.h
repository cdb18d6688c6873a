/* fuzz.h: what the libFuzzer harnesses (tests/fuzz/fuzz_*.c) share: the
 * entry point's prototype and FUZZ_CHECK, which turns a broken property
 * into a crash that libFuzzer reports and keeps the input of. A harness
 * checks properties of what the code under test answers, not only that it
 * does not crash. */
#ifndef TESTS_FUZZ_FUZZ_H
#define TESTS_FUZZ_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, __LINE__, #cond);            \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
