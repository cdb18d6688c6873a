/* apikey.c: key generation and keyed hashing with libsodium (see apikey.h). */
#include "common/apikey.h"

#include <sodium.h>
#include <string.h>

int apikey_pepper_init(apikey_pepper *p, const char *secret)
{
    size_t n = secret ? strlen(secret) : 0;
    if (n < 16) return -1;
    /* Stretch/compress any length into exactly the 32-byte BLAKE2b key. */
    crypto_generichash(p->key, sizeof p->key, (const unsigned char *)secret, n, NULL, 0);
    return 0;
}

int apikey_generate(char out[APIKEY_LEN + 1])
{
    return apikey_token(APIKEY_PREFIX, out);
}

int apikey_token(const char *prefix, char out[APIKEY_LEN + 1])
{
    unsigned char raw[32];
    size_t pre = strlen(prefix);
    if (pre != 4 || sodium_init() < 0) return -1;
    randombytes_buf(raw, sizeof raw);
    memcpy(out, prefix, pre);
    sodium_bin2base64(out + pre, APIKEY_LEN + 1 - pre, raw, sizeof raw,
                      sodium_base64_VARIANT_URLSAFE_NO_PADDING);
    sodium_memzero(raw, sizeof raw);
    return 0;
}

int apikey_wellformed(const char *key, size_t len)
{
    size_t pre = strlen(APIKEY_PREFIX);
    if (len != APIKEY_LEN || memcmp(key, APIKEY_PREFIX, pre) != 0) return 0;
    for (size_t i = pre; i < len; i++) {
        char c = key[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_'))
            return 0;
    }
    return 1;
}

int apikey_hash(const apikey_pepper *p, const char *key, size_t len, char out[APIKEY_HASH_HEX + 1])
{
    if (!apikey_wellformed(key, len)) return -1;
    apikey_hash_secret(p, key, len, out);
    return 0;
}

void apikey_hash_secret(const apikey_pepper *p, const char *key, size_t len,
                        char out[APIKEY_HASH_HEX + 1])
{
    unsigned char h[32];
    crypto_generichash(h, sizeof h, (const unsigned char *)key, len, p->key, sizeof p->key);
    sodium_bin2hex(out, APIKEY_HASH_HEX + 1, h, sizeof h);
}

int apikey_secret_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    unsigned char ha[32], hb[32];
    crypto_generichash(ha, sizeof ha, (const unsigned char *)a, alen, NULL, 0);
    crypto_generichash(hb, sizeof hb, (const unsigned char *)b, blen, NULL, 0);
    return sodium_memcmp(ha, hb, sizeof ha) == 0;
}
