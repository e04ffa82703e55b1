/*
 * evproxy: doorbells and cross-thread messages for tevent loops.
 *
 * Copyright (C) 2026 The evproxy authors
 *
 * This library is free software; you can redistribute it and/or modify it
 * under the terms of the GNU Lesser General Public License as published by
 * the Free Software Foundation; either version 3 of the License, or (at
 * your option) any later version.  See COPYING.
 */

#ifndef EVPROXY_H
#define EVPROXY_H

#include <stdbool.h>
#include <stdint.h>
#include <talloc.h>
#include <tevent.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * @defgroup evproxy_doorbell Doorbells
 *
 * A doorbell lives on a tevent context (its owner loop). Any thread, or a
 * signal handler, may ring it; rings coalesce, and the handler runs on the
 * owner loop with the number of rings it covers. Uses: shutdown signalling,
 * work distribution (a queue plus a doorbell), cross-thread notifications.
 *
 * Works on every tevent backend. On an evpoll loop that is spinning a ring
 * costs no syscall: the loop sees it in memory. Otherwise only the ring
 * that makes the doorbell pending writes its eventfd; rings of a doorbell
 * that is already pending are a single atomic add.
 *
 * The ring protocol (see lib/evproxy/doorbell.c):
 * - ringer: one seq_cst fetch-add on the pending count; if the count was
 *   0 and the loop may sleep (a seq_cst load of its evpoll_waker), write
 *   the eventfd;
 * - spinning loop: a poll callback sees the count and takes it with an
 *   atomic exchange; before sleeping the loop stores "may sleep" (seq_cst)
 *   and the doorbell's exit callback loads the count (seq_cst): if a ring
 *   slipped in, it writes the eventfd itself, so the loop cannot sleep on a
 *   pending ring;
 * - sleeping loop: the eventfd's tevent_fd handler drains the eventfd
 *   first and then exchanges the count, so a ring after the exchange finds
 *   0 and writes again.
 *
 * @{
 */

struct evproxy_doorbell;
struct evproxy_ringer;

/**
 * Doorbell handler, run on the owner loop.
 * @param rings	number of rings this call covers (>= 1)
 */
typedef void (*evproxy_doorbell_handler_t)(struct tevent_context *ev,
					   struct evproxy_doorbell *db,
					   uint64_t rings,
					   void *private_data);

/** Statistics of a doorbell, see evproxy_doorbell_get_stats(). */
struct evproxy_doorbell_stats {
	/** successful rings (delivered plus pending) */
	uint64_t rings;
	/** handler calls */
	uint64_t handler_calls;
	/** eventfd writes: rings that had to wake the loop through the kernel */
	uint64_t kernel_wakeups;
	/** rings that needed no syscall (coalesced, or the loop was spinning) */
	uint64_t wakeups_avoided;
	/** rings not yet delivered */
	uint64_t pending;
};

/**
 * Create a doorbell on @p ev. Owner thread.
 *
 * @param ev		the owner loop (any backend)
 * @param mem_ctx	talloc parent; talloc_free() of the doorbell removes
 *			it, also from inside its own handler. Pending rings
 *			are then discarded and ringers get ECANCELED.
 * @param handler	required
 * @return the doorbell, or NULL with errno EINVAL (NULL @p ev or
 *         @p handler), ENOMEM, or EMFILE/ENFILE (no fd for the eventfd);
 *         nothing is leaked on failure.
 */
struct evproxy_doorbell *evproxy_add_doorbell(struct tevent_context *ev,
					      TALLOC_CTX *mem_ctx,
					      evproxy_doorbell_handler_t handler,
					      void *private_data);

/**
 * Ring a doorbell. Any thread, and async-signal-safe, as long as the
 * doorbell is not freed meanwhile; a thread that cannot guarantee that
 * rings through an evproxy_ringer.
 * @return 0, EINVAL (NULL), ECANCELED (doorbell freed, or inherited
 *         across fork()), or the errno of the eventfd write.
 */
int evproxy_ring_doorbell(struct evproxy_doorbell *db);

/**
 * An fd that is readable while a ring is pending, for a foreign loop
 * (plain epoll, poll, GLib) that waits on behalf of the owner loop; when it
 * is readable, run the owner loop (tevent_loop_once()) to deliver the
 * rings. Once this was called, every ring that makes the doorbell pending
 * writes the eventfd, even to a spinning evpoll loop. Owner thread.
 * @return the fd (owned by the doorbell), or -1 with errno EINVAL.
 */
int evproxy_doorbell_fd(struct evproxy_doorbell *db);

/**
 * Get a handle for ringing @p db from other threads. Owner thread.
 * The handle stays valid after the doorbell and its loop are freed; then
 * evproxy_ringer_ring() returns ECANCELED.
 * @return a new reference (release with evproxy_ringer_unref()), or NULL
 *         with errno EINVAL.
 */
struct evproxy_ringer *evproxy_doorbell_ringer(struct evproxy_doorbell *db);

/**
 * Ring through a ringer. Any thread, async-signal-safe, no mutex.
 * @return 0, EINVAL (NULL), ECANCELED (doorbell freed, or inherited across
 *         fork()), or the errno of the eventfd write.
 */
int evproxy_ringer_ring(struct evproxy_ringer *r);

/** Take another reference. Any thread. @return @p r (NULL if NULL). */
struct evproxy_ringer *evproxy_ringer_ref(struct evproxy_ringer *r);

/** Drop a reference; the last one frees the memory. Any thread. */
void evproxy_ringer_unref(struct evproxy_ringer *r);

/**
 * Read a doorbell's statistics. Owner thread.
 * @return 0 or EINVAL.
 */
int evproxy_doorbell_get_stats(struct evproxy_doorbell *db,
			       struct evproxy_doorbell_stats *st);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* EVPROXY_H */
