/* operators.h: named operators (admins and finance staff) and their tokens.
 * Owns the operators table; tokens ("pgo_" + 43 base64url chars) are shown
 * once and stored only as keyed hashes. Does not own the bootstrap tokens of
 * the environment (api.c checks those first). */
#ifndef POINTGATE_OPERATORS_H
#define POINTGATE_OPERATORS_H

#include "common/apikey.h"
#include "billing/ledger.h"

#define OPERATOR_PREFIX "pgo_"

typedef struct operator_info {
    int64_t id;
    char name[65];
    char role[16];
    char created_at[40];
    int revoked;
} operator_info;

/* 0 if NAME is a valid operator name (lower-case letters, digits, . _ -). */
int operators_valid_name(const char *name);

/* Adds an operator; TOKEN gets its token. LEDGER_CONFLICT if the name exists. */
int operators_add(PGconn *pg, const apikey_pepper *pepper, const char *name, const char *role,
                  char token[APIKEY_LEN + 1]);
/* Revokes at once. LEDGER_NOT_FOUND if no live operator has that name. */
int operators_revoke(PGconn *pg, const char *name);
/* The live operator holding TOKEN; LEDGER_NOT_FOUND if none. */
int operators_authenticate(PGconn *pg, const apikey_pepper *pepper, const char *token,
                           operator_info *out);
/* Every operator, into a malloc'd array (caller frees). */
int operators_list(PGconn *pg, operator_info **out, int *n);

#endif
