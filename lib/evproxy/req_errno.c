/*
 * The errno-style result of a finished tevent_req, see req_errno.h.
 */
#include <errno.h>
#include <stdint.h>

#include "req_errno.h"

int evproxy_req_errno(struct tevent_req *req)
{
	enum tevent_req_state state;
	uint64_t err;
	int ret = 0;

	if (req == NULL) {
		return EINVAL;
	}
	if (tevent_req_is_error(req, &state, &err)) {
		switch (state) {
		case TEVENT_REQ_USER_ERROR:
			ret = (int)err;
			break;
		case TEVENT_REQ_TIMED_OUT:
			ret = ETIMEDOUT;
			break;
		case TEVENT_REQ_NO_MEMORY:
			ret = ENOMEM;
			break;
		default:
			ret = EINVAL;
			break;
		}
	}
	tevent_req_received(req);
	return ret;
}
