/*
 * A drop-in for tevent_thread_proxy_create/_schedule on top of evproxy:
 * an unbounded evproxy whose items are (immediate, tevent handler,
 * private pointer). Immediates the handlers leave alone come back to be
 * freed by the senders (im_recycle.c).
 */
#include <errno.h>

#include "proxy_internal.h"

struct evproxy_thread_proxy {
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
	struct evq_item item;

	if (tp == NULL || pp_im == NULL || *pp_im == NULL || handler == NULL) {
		return;
	}
	/* as tevent: detach both from the caller's (thread-local) tree */
	item.msg = talloc_steal(NULL, *pp_im);
	item.fn = (void *)handler;
	item.private_data = NULL;
	if (pp_private != NULL) {
		item.private_data = talloc_steal(NULL, *pp_private);
		*pp_private = NULL;
	}
	*pp_im = NULL;
	if (evproxy_push(tp->s, &item) != 0) {
		/* ownership was transferred: do not leak */
		evproxy_item_free(EVPROXY_IMMEDIATES, &item);
	}
	/* free what the destination handed back, see im_recycle.c */
	im_recycle_collect(&tp->s->recycled);
}
