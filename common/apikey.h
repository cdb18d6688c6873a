/* apikey.h: API key format, generation and hashing.
 * Owns what a key looks like and how it is turned into the only form ever
 * stored (a keyed BLAKE2b hash with KEY_PEPPER). Does not own storage: the
 * ledger keeps the hashes in Postgres, hot.c mirrors live ones into Redis.
 *
 * A key is "pgk_" followed by 43 base64url characters (32 random bytes). */
#ifndef POINTGATE_APIKEY_H
#define POINTGATE_APIKEY_H

#include <stddef.h>

#define APIKEY_PREFIX "pgk_"
#define APIKEY_LEN 47      /* strlen(prefix) + 43 */
#define APIKEY_HASH_HEX 64 /* hex digits of the 32-byte hash */

typedef struct apikey_pepper {
    unsigned char key[32];
} apikey_pepper;

/* Derives the hashing key from KEY_PEPPER. -1 if the secret is shorter than
 * 16 bytes (a weak pepper makes stolen hashes brute-forceable). */
int apikey_pepper_init(apikey_pepper *p, const char *secret);

/* Writes a fresh key (APIKEY_LEN chars + NUL). -1 if libsodium is not ready. */
int apikey_generate(char out[APIKEY_LEN + 1]);

/* A token of the same shape with another 4-character PREFIX (operator
 * tokens are "pgo_..."). -1 if the prefix is not 4 characters. */
int apikey_token(const char *prefix, char out[APIKEY_LEN + 1]);

/* The keyed hash of any secret, with no format check (operator tokens). */
void apikey_hash_secret(const apikey_pepper *p, const char *secret, size_t len,
                        char out[APIKEY_HASH_HEX + 1]);

/* 1 if KEY has the shape of a key, else 0. Cheap; run before hashing so
 * garbage never reaches Redis or Postgres. */
int apikey_wellformed(const char *key, size_t len);

/* Hex hash of a well-formed key into OUT (APIKEY_HASH_HEX + NUL). -1 if malformed. */
int apikey_hash(const apikey_pepper *p, const char *key, size_t len, char out[APIKEY_HASH_HEX + 1]);

/* Constant-time equality of two secrets of any length (hashes both first, so
 * neither the content nor the length leaks through timing). 1 if equal. */
int apikey_secret_equal(const char *a, size_t alen, const char *b, size_t blen);

#endif
