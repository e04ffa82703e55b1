/*
 * A drop-in for tevent_thread_proxy_create/_schedule on top of evproxy:
 * an unbounded evproxy whose items are (immediate, tevent handler,
 * private pointer). Immediates the handlers leave alone come back to be
 * freed by the senders (im_recycle.c).
 */
#include <errno.h>

#include "proxy_internal.h"

struct evproxy_thread_proxy {
	struct tevent_context *ev;	/* the destination */
	struct evproxy *p;
	struct evproxy_sender *s;
};

static int tp_destructor(struct evproxy_thread_proxy *tp)
{
	evproxy_sender_unref(tp->s);
	return 0;
}

_PUBLIC_ struct evproxy_thread_proxy *evproxy_thread_proxy_create(
	struct tevent_context *dest_ev)
{
	struct evproxy_thread_proxy *tp;

	if (dest_ev == NULL) {
		errno = EINVAL;
		return NULL;
	}
	tp = talloc_zero(dest_ev, struct evproxy_thread_proxy);
	if (tp == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	tp->ev = dest_ev;
	tp->p = evproxy_create_kind(tp, dest_ev, NULL, EVPROXY_IMMEDIATES);
	if (tp->p == NULL) {
		talloc_free(tp);
		return NULL;
	}
	tp->s = evproxy_sender(tp->p);
	talloc_set_destructor(tp, tp_destructor);
	return tp;
}

_PUBLIC_ void evproxy_thread_proxy_schedule(struct evproxy_thread_proxy *tp,
					    struct tevent_immediate **pp_im,
					    tevent_immediate_handler_t handler,
					    void *pp_private_data)
{
	void **pp_private = pp_private_data;
	struct evproxy_sender *s;
	struct evq_item item;

	if (tp == NULL || pp_im == NULL || *pp_im == NULL || handler == NULL) {
		return;
	}
	/*
	 * Once the item is queued its handler may run and free the proxy
	 * (tevent's proxy allows that), so nothing after the push may touch
	 * tp, and the core must outlive our use of it: hold a reference.
	 */
	s = evproxy_sender_ref(tp->s);
	/* free what the destination handed back, see im_recycle.c */
	im_recycle_collect(&s->recycled);
	/*
	 * Cancel a schedule the immediate may still have, as tevent's proxy
	 * does by scheduling it on the destination; here on the sending
	 * thread, which owns it (and normally the context it is on). With
	 * no handler, tevent only cancels: the destination context is not
	 * touched. Else it could be handed back (im_recycle.c) while a
	 * context still lists it.
	 */
	tevent_schedule_immediate(*pp_im, tp->ev, NULL, NULL);
	/* as tevent: detach both from the caller's (thread-local) tree */
	item.msg = talloc_steal(NULL, *pp_im);
	item.fn = (void *)handler;
	item.private_data = NULL;
	if (pp_private != NULL) {
		item.private_data = talloc_steal(NULL, *pp_private);
		*pp_private = NULL;
	}
	*pp_im = NULL;
	if (evproxy_push(s, &item) != 0) {
		/* ownership was transferred: do not leak */
		evproxy_item_free(EVPROXY_IMMEDIATES, &item);
	}
	evproxy_sender_unref(s);
}
