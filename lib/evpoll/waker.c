/*
 * The waker: a loop's "may be asleep" flag, refcounted so that producers on
 * other threads can keep reading it after the loop is gone.
 */
#include <errno.h>
#include <stdlib.h>

#include "evpoll_internal.h"

struct evpoll_waker *evpoll_waker_new(void)
{
	struct evpoll_waker *w = malloc(sizeof(*w));

	if (w == NULL) {
		return NULL;
	}
	atomic_init(&w->refs, 1);
	atomic_init(&w->may_sleep, true);
	return w;
}

/* Shared by every non-evpoll context: may_sleep is always true. */
static struct evpoll_waker always_sleeps = {
	.refs = 1,
	.may_sleep = true,
};

_PUBLIC_ struct evpoll_waker *evpoll_waker_get(struct tevent_context *ev)
{
	struct evpoll_state *st;

	if (ev == NULL) {
		errno = EINVAL;
		return NULL;
	}
	st = evpoll_state_get(ev);
	if (st == NULL) {
		return &always_sleeps;
	}
	/* relaxed: the loop's own reference keeps it alive meanwhile */
	atomic_fetch_add_explicit(&st->waker->refs, 1, memory_order_relaxed);
	return st->waker;
}

_PUBLIC_ bool evpoll_waker_may_sleep(const struct evpoll_waker *w)
{
	if (w == NULL) {
		return true;
	}
	/* seq_cst: pairs with the loop's seq_cst store in evpoll_spin_exit */
	return atomic_load_explicit(&w->may_sleep, memory_order_seq_cst);
}

_PUBLIC_ void evpoll_waker_unref(struct evpoll_waker *w)
{
	if (w == NULL || w == &always_sleeps) {
		return;
	}
	/* acq_rel: the last owner sees all other owners' uses */
	if (atomic_fetch_sub_explicit(&w->refs, 1, memory_order_acq_rel) == 1) {
		free(w);
	}
}
