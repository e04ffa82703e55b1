/*
 * Delivery frames: an object whose handler may free it (or run a nested
 * loop that delivers again, and frees it there) keeps a stack of the
 * deliveries in progress; its destructor marks them all, and each delivery
 * checks its own frame before touching the object again.
 */
#ifndef EVPROXY_FRAME_H
#define EVPROXY_FRAME_H

#include <stdbool.h>
#include <stddef.h>

struct evproxy_frame {
	struct evproxy_frame *prev;
	bool freed;
};

static inline void evproxy_frame_push(struct evproxy_frame **top,
				      struct evproxy_frame *f)
{
	f->prev = *top;
	f->freed = false;
	*top = f;
}

/* Only when the object still exists (f->freed is false). */
static inline void evproxy_frame_pop(struct evproxy_frame **top,
				     struct evproxy_frame *f)
{
	*top = f->prev;
}

static inline void evproxy_frames_freed(struct evproxy_frame *top)
{
	for (; top != NULL; top = top->prev) {
		top->freed = true;
	}
}

#endif
