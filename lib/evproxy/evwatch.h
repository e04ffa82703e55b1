/*
 * Watch a tevent context for its end: an object that lives elsewhere in
 * the talloc tree (a doorbell, an evproxy) learns when its loop is freed.
 */
#ifndef EVPROXY_EVWATCH_H
#define EVPROXY_EVWATCH_H

#include <tevent.h>

struct evproxy_evwatch;

/* Called once, from inside talloc_free() of the context. */
typedef void (*evproxy_evwatch_fn)(void *private_data);

/*
 * A talloc child of ev that calls fn when ev is freed. NULL on ENOMEM.
 */
struct evproxy_evwatch *evproxy_evwatch_new(struct tevent_context *ev,
					    evproxy_evwatch_fn fn,
					    void *private_data);

/* Free the watch without calling fn (the owner goes first). NULL is ok. */
void evproxy_evwatch_cancel(struct evproxy_evwatch *w);

#endif
