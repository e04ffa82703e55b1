/*
 * evproxy internals shared by proxy.c, send_req.c and thread_proxy.c.
 */
#ifndef EVPROXY_PROXY_INTERNAL_H
#define EVPROXY_PROXY_INTERNAL_H

#include <stdalign.h>
#include <stdatomic.h>

#include "asym.h"
#include "evproxy.h"
#include "im_recycle.h"
#include "queue.h"
#include "visibility.h"

/* How the destination hands a queued item to the user. */
enum evproxy_kind {
	EVPROXY_MESSAGES,	/* msg, evproxy_msg_handler_t, private_data */
	EVPROXY_IMMEDIATES,	/* im, tevent_immediate_handler_t, private */
};

/* A sender blocked on a full queue, see send_req.c. */
struct evproxy_waiter {
	struct evproxy_waiter *prev, *next;
	struct evproxy_ringer *ringer;	/* wakes the waiting loop */
	bool listed;			/* under wait_lock */
};

/*
 * The part shared with sending threads (malloc, refcounted):
 * struct evproxy_sender IS this core; a sender handle is a reference.
 */
struct evproxy_sender {
	/*
	 * relaxed increments (the caller holds a reference); acq_rel
	 * decrement: the last owner sees every other use before freeing.
	 * Alone on its line: the drop-in takes a reference per send, and
	 * the destination reads the fields below on every poll.
	 */
	atomic_uint refs;
	alignas(64) enum evproxy_kind kind;
	pid_t pid;	/* an evproxy inherited across fork() is dead */
	/* wakes the destination's loop; its doorbell lives there */
	struct evproxy_ringer *ringer;

	/* asym_init() at creation: which barriers the handshakes use */
	bool asym;

	/*
	 * The destination is gone: evq_kill() on the queue (see queue.h),
	 * after which every push fails with ECANCELED and the destination's
	 * final drain (evq_pop_final) takes every message that was queued.
	 */

	/*
	 * True while the destination may not look at the queue without a
	 * wake-up: Dekker's handshake, see asym.h. The destination stores
	 * true, asym_heavy_barrier(), then checks the queue (evq_ready); a
	 * sender publishes its message (evq_push), asym_light_barrier(),
	 * then loads 'idle'. At least one side sees the other's store; the
	 * sender that exchanges 'idle' from true to false rings the doorbell.
	 */
	alignas(64) atomic_bool idle;

	/*
	 * Senders waiting for space (bounded queues): Dekker's handshake
	 * again, with the waiter as the slow side. A waiter registers
	 * (nwaiters++ under the lock), asym_heavy_barrier(), then
	 * retries; the consumer frees slots (release stores),
	 * asym_light_barrier(), then loads nwaiters. Either the consumer
	 * sees the waiter and rings it, or the retry sees the freed slots.
	 */
	alignas(64) atomic_uint nwaiters;
	pthread_mutex_t wait_lock;
	struct evproxy_waiter *waiters, *waiters_tail;	/* FIFO */

	/* relaxed counters: statistics only */
	atomic_uint_fast64_t discarded;

	/* EVPROXY_IMMEDIATES: immediates a sender frees, see im_recycle.c */
	alignas(64) struct im_return recycled;

	struct evq q;
};

struct evproxy {
	struct tevent_context *ev;
	struct evproxy_evwatch *watch;	/* shuts down with the loop */
	bool shut;			/* evproxy_shutdown() ran */
	struct evproxy_sender *core;
	struct evproxy_doorbell *db;
	struct evpoll_poll *poll;
	unsigned batch;
	void *spare_holder;	/* holds a message while its handler runs */
	void *spare_im_holder;	/* EVPROXY_IMMEDIATES: holds the immediate */
	struct tevent_immediate *cont_im;	/* see cont_handler */
	uint64_t cont_runs;
	struct evproxy_frame *frames;	/* deliveries in progress */
	uint64_t delivered;
	uint64_t batches;
};

struct evproxy *evproxy_create_kind(TALLOC_CTX *mem_ctx,
				    struct tevent_context *dest_ev,
				    const struct evproxy_config *cfg,
				    enum evproxy_kind kind);

/* Queue an item and wake the destination. 0, EAGAIN, ECANCELED, ENOMEM. */
int evproxy_push(struct evproxy_sender *s, const struct evq_item *item);

/* send_req.c: the consumer rings every registered waiter */
void evproxy_wake_waiters(struct evproxy_sender *s);

/* Free an undelivered item according to the queue's kind. */
void evproxy_item_free(enum evproxy_kind kind, const struct evq_item *item);

/* Check the ownership rules of a message; 0 or EINVAL. */
int evproxy_msg_check(const void *msg);

#endif
