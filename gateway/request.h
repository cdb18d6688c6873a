/* request.h: the life of one client request, as a state machine driven by
 * MHD callbacks, Redis replies, upstream completion and timers, all on the
 * worker's loop. Owns the request's memory, its hold (reserve/settle) and
 * its answer. Does not own any connection or the loop (worker.c). */
#ifndef GATEWAY_REQUEST_H
#define GATEWAY_REQUEST_H

#include <microhttpd.h>
#include <stddef.h>

struct worker;
typedef struct gw_request gw_request;

/* From MHD's URI log callback: URI is the raw request target. NULL on OOM. */
gw_request *request_new(struct worker *w, const char *uri);
/* The MHD access handler for this request. */
enum MHD_Result request_handle(gw_request *r, struct MHD_Connection *conn, const char *method,
                               const char *upload_data, size_t *upload_data_size);
/* MHD is done with the request (answered or connection closed): free it. */
void request_completed(gw_request *r);
/* Shutdown past its grace: fail every suspended request now (holds released). */
void request_abort_all(struct worker *w);

#endif
