/*
 * The errno-style result of a finished tevent_req, for _recv functions.
 */
#ifndef EVPROXY_REQ_ERRNO_H
#define EVPROXY_REQ_ERRNO_H

#include <tevent.h>

/*
 * 0 if req succeeded, else its errno value (tevent_req_error), ENOMEM,
 * ETIMEDOUT or EINVAL; EINVAL for NULL. Calls tevent_req_received().
 */
int evproxy_req_errno(struct tevent_req *req);

#endif
