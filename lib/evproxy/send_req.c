/*
 * evproxy_send_send/recv: sending with backpressure.
 *
 * While the queue is full the request registers a waiter: a ringer of a
 * doorbell on the sender's own loop. The destination, after freeing slots,
 * rings every registered waiter ("queue has space"); each retries. See
 * 'nwaiters' in proxy_internal.h for why no wake-up is lost.
 */
#include <errno.h>
#include <stdlib.h>
#include <tevent.h>

#include "req_errno.h"
#include "evlist.h"
#include "proxy_internal.h"

struct send_state {
	struct tevent_context *ev;
	struct evproxy_sender *s;	/* a reference of our own */
	evproxy_msg_handler_t handler;
	void *private_data;
	void **pmsg;
	struct evproxy_doorbell *db;	/* rung when space appears */
	struct evproxy_waiter *w;	/* registered waiter, or NULL */
};

/*
 * Waiter ownership: the request allocates and frees its waiter; the
 * destination only unlinks waiters and rings them, under wait_lock. So the
 * request may look at w->listed under the lock at any time.
 */

/* Caller holds wait_lock. */
static void waiter_unlink(struct evproxy_sender *s, struct evproxy_waiter *w)
{
	EVLIST_REMOVE(s->waiters, s->waiters_tail, w);
	w->listed = false;
	atomic_fetch_sub_explicit(&s->nwaiters, 1, memory_order_relaxed);
}

void evproxy_wake_waiters(struct evproxy_sender *s)
{
	struct evproxy_waiter *w;

	if (!s->q.bounded) {
		/* nobody waits for space in an unbounded queue */
		return;
	}
	/* slots freed (release), light barrier, load: see nwaiters */
	asym_light_barrier(s->asym);
	if (atomic_load_explicit(&s->nwaiters, memory_order_relaxed) == 0) {
		return;
	}
	pthread_mutex_lock(&s->wait_lock);
	/*
	 * Ring in registration order, under the lock: a ring is an atomic
	 * add and at most one eventfd write, and the lock is what keeps the
	 * waiter alive meanwhile.
	 */
	while ((w = s->waiters) != NULL) {
		waiter_unlink(s, w);
		evproxy_ringer_ring(w->ringer);
	}
	pthread_mutex_unlock(&s->wait_lock);
}

/* Unregister our waiter (if still listed) and free it. */
static void state_unwait(struct send_state *st)
{
	struct evproxy_waiter *w = st->w;

	if (w == NULL) {
		return;
	}
	st->w = NULL;
	pthread_mutex_lock(&st->s->wait_lock);
	if (w->listed) {
		waiter_unlink(st->s, w);
	}
	pthread_mutex_unlock(&st->s->wait_lock);
	evproxy_ringer_unref(w->ringer);
	free(w);
}

static int state_destructor(struct send_state *st)
{
	state_unwait(st);
	evproxy_sender_unref(st->s);
	return 0;
}

/* Register for "space appeared"; 0 or ENOMEM. */
static int state_wait(struct send_state *st)
{
	struct evproxy_waiter *w = calloc(1, sizeof(*w));

	if (w == NULL) {
		return ENOMEM;
	}
	w->ringer = evproxy_doorbell_ringer(st->db);
	pthread_mutex_lock(&st->s->wait_lock);
	EVLIST_APPEND(st->s->waiters, st->s->waiters_tail, w);
	w->listed = true;
	atomic_fetch_add_explicit(&st->s->nwaiters, 1, memory_order_relaxed);
	pthread_mutex_unlock(&st->s->wait_lock);
	/* registered, heavy barrier, then the caller retries: see nwaiters */
	asym_heavy_barrier(st->s->asym);
	st->w = w;
	return 0;
}

/* Try to send; completes the request unless the queue is full. */
static void try_send(struct tevent_req *req)
{
	struct send_state *st = tevent_req_data(req, struct send_state);
	int ret;

	for (;;) {
		ret = evproxy_send(st->s, st->handler, st->private_data,
				   st->pmsg);
		if (ret != EAGAIN) {
			break;
		}
		if (st->w != NULL) {
			pthread_mutex_lock(&st->s->wait_lock);
			if (st->w->listed) {
				/* registered before this retry: wait */
				pthread_mutex_unlock(&st->s->wait_lock);
				return;
			}
			/* already rung: register again */
			pthread_mutex_unlock(&st->s->wait_lock);
			state_unwait(st);
			continue;
		}
		ret = state_wait(st);
		if (ret != 0) {
			break;
		}
		/* retry once more now that we are registered */
	}
	state_unwait(st);
	/* no more "space" rings for a finished request */
	TALLOC_FREE(st->db);
	if (ret == 0) {
		tevent_req_done(req);
	} else {
		tevent_req_error(req, ret);
	}
}

static void space_handler(struct tevent_context *ev,
			  struct evproxy_doorbell *db, uint64_t rings,
			  void *private_data)
{
	struct tevent_req *req = private_data;

	if (!tevent_req_is_in_progress(req)) {
		return;
	}
	/* the destination unlinked our waiter; try_send frees it */
	try_send(req);
}

_PUBLIC_ struct tevent_req *evproxy_send_send(TALLOC_CTX *mem_ctx,
					      struct tevent_context *ev,
					      struct evproxy_sender *s,
					      evproxy_msg_handler_t handler,
					      void *private_data, void *pmsg)
{
	struct tevent_req *req;
	struct send_state *st;
	void **pp = pmsg;
	int ret;

	req = tevent_req_create(mem_ctx, &st, struct send_state);
	if (req == NULL) {
		return NULL;
	}
	if (ev == NULL || s == NULL || handler == NULL || pp == NULL ||
	    *pp == NULL) {
		if (ev == NULL) {
			/* nothing to post on: fail at once */
			talloc_free(req);
			errno = EINVAL;
			return NULL;
		}
		tevent_req_error(req, EINVAL);
		return tevent_req_post(req, ev);
	}
	st->ev = ev;
	st->s = evproxy_sender_ref(s);
	st->handler = handler;
	st->private_data = private_data;
	st->pmsg = pp;
	talloc_set_destructor(st, state_destructor);

	ret = evproxy_send(s, handler, private_data, pp);
	if (ret != EAGAIN) {
		if (ret == 0) {
			tevent_req_done(req);
		} else {
			tevent_req_error(req, ret);
		}
		return tevent_req_post(req, ev);
	}
	st->db = evproxy_add_doorbell(ev, st, space_handler, req);
	if (st->db == NULL) {
		/* EMFILE/ENFILE or ENOMEM, as evproxy_add_doorbell said */
		tevent_req_error(req, errno != 0 ? errno : ENOMEM);
		return tevent_req_post(req, ev);
	}
	try_send(req);
	if (tevent_req_is_in_progress(req)) {
		return req;
	}
	return tevent_req_post(req, ev);
}

_PUBLIC_ int evproxy_send_recv(struct tevent_req *req)
{
	return evproxy_req_errno(req);
}
