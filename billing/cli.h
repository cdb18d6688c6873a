/* cli.h: the admin and finance subcommands of bin/billing. They call the
 * same library code as the HTTP API (control.c, ledger.c, reports.c,
 * operators.c), so a CLI top-up reaches Redis exactly like an API one.
 *
 * Exit codes a script can rely on: 0 done; 1 a store is unreachable or
 * failed (retry); 2 usage error (bad arguments: nothing was done); 3 not
 * found; 4 refused (conflict, insufficient points, limit). */
#ifndef POINTGATE_CLI_H
#define POINTGATE_CLI_H

enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2, CLI_NOT_FOUND = 3, CLI_REFUSED = 4 };

/* Runs "billing CMD ..." for CMD in accounts, keys, topup, adjust, report,
 * operators. Returns the exit code, or -1 if CMD is not one of these. */
int cli_run(int argc, char **argv);

#endif
