/*
 * The tevent_thread_proxy drop-in hands the immediates its handlers left
 * alone back to a sending thread, to be freed there. See im_recycle.c.
 */
#ifndef EVPROXY_IM_RECYCLE_H
#define EVPROXY_IM_RECYCLE_H

#include <stdatomic.h>
#include <tevent.h>

/* Immediates a drain set aside, linked through their bodies. */
struct im_chain {
	void *head;
	void *tail;
};

/*
 * Where a drain's chain waits for a sender: NULL or one chain. The
 * destination stores a chain with a release CAS from NULL; a sender takes
 * it with an acquire exchange, so the destination's last writes to those
 * immediates (unlinking them, the links) happen before the sender frees
 * them.
 */
struct im_return {
	_Atomic(void *) chain;
};

/* Destination, before the handler: watch *im (it is in im_holder). */
void im_recycle_watch(struct tevent_immediate *im);

/*
 * Destination, after the handler. If the handler left the immediate alone
 * it is detached from im_holder, added to *c and true is returned; else
 * whatever is left in im_holder is freed now, as tevent would.
 */
bool im_recycle_take(struct tevent_immediate *im, void *im_holder,
		     struct im_chain *c);

/*
 * Destination, when a drain ends: offer *c to the senders. If the previous
 * chain was not taken yet, free *c here (so at most one chain waits).
 */
void im_recycle_publish(struct im_return *r, struct im_chain *c);

/* Destination, if the drain cannot publish (its evproxy was freed). */
void im_recycle_free_chain(struct im_chain *c);

/* A sending thread: free the waiting chain, if any. Any thread. */
void im_recycle_collect(struct im_return *r);

#endif
