/*
 * Watch a tevent context for its end, see evwatch.h.
 */
#include "evwatch.h"

struct evproxy_evwatch {
	evproxy_evwatch_fn fn;
	void *private_data;
};

static int evwatch_destructor(struct evproxy_evwatch *w)
{
	/*
	 * Freed with the context, or cancelled by its owner; the owner's
	 * callback forgets the watch, its destructor frees it: either way
	 * the callback runs at most once.
	 */
	if (w->fn != NULL) {
		evproxy_evwatch_fn fn = w->fn;

		w->fn = NULL;
		fn(w->private_data);
	}
	return 0;
}

struct evproxy_evwatch *evproxy_evwatch_new(struct tevent_context *ev,
					    evproxy_evwatch_fn fn,
					    void *private_data)
{
	struct evproxy_evwatch *w = talloc(ev, struct evproxy_evwatch);

	if (w == NULL) {
		return NULL;
	}
	w->fn = fn;
	w->private_data = private_data;
	talloc_set_destructor(w, evwatch_destructor);
	return w;
}

void evproxy_evwatch_cancel(struct evproxy_evwatch *w)
{
	if (w != NULL) {
		w->fn = NULL;
		talloc_free(w);
	}
}
