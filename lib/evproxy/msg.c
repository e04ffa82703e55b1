/*
 * The ownership rules of a message, as far as talloc lets a library check
 * them (see evproxy.h).
 */
#include <errno.h>
#include <string.h>

#include "proxy_internal.h"

int evproxy_msg_check(const void *msg)
{
	/*
	 * A parent means the chunk is part of another tree (or, with null
	 * tracking on, of the global null context; a pool member's parent
	 * is its pool). References would let another owner free it.
	 */
	if (talloc_parent(msg) != NULL || talloc_reference_count(msg) != 0) {
		return EINVAL;
	}
	return 0;
}

_PUBLIC_ void *evproxy_msg_new(size_t size, const char *name)
{
	void *msg = talloc_named_const(NULL, size, name);

	if (msg == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	if (talloc_parent(msg) != NULL) {
		/* null tracking is on: not safe to move between threads */
		talloc_free(msg);
		errno = EINVAL;
		return NULL;
	}
	memset(msg, 0, size);
	return msg;
}
