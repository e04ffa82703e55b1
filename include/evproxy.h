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
#include <stddef.h>
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
	/**
	 * eventfd writes: by rings that had to wake the loop through the
	 * kernel, and by the owner side (a loop about to sleep with a ring
	 * pending, evproxy_doorbell_fd() with a ring pending)
	 */
	uint64_t kernel_wakeups;
	/** the eventfd writes of kernel_wakeups that rings made */
	uint64_t ring_wakeups;
	/**
	 * rings that needed no syscall (coalesced, or the loop was
	 * spinning): rings == wakeups_avoided + ring_wakeups
	 */
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
 *			are then discarded and ringers get ECANCELED. The
 *			same happens when @p ev is freed first (the
 *			doorbell then only waits for its own free).
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
 * @return 0, EINVAL (NULL), ECANCELED (doorbell or its loop freed, or
 *         the doorbell was inherited across fork(): in a child it is dead,
 *         never delivers and never wakes the parent), or the errno of the
 *         eventfd write.
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

/**
 * @defgroup evproxy_msg Cross-thread messages
 *
 * An evproxy delivers talloc messages from any thread to handlers on its
 * destination loop, in FIFO order per sending thread, with no syscall per
 * message while the destination is busy or spinning, and no lock on the
 * send path.
 *
 * Ownership rules (checked where talloc allows; see evproxy_send()):
 * - a message is a top-level talloc chunk: its parent is the NULL context
 *   and it has no talloc references;
 * - it is not allocated from, and does not contain, a talloc pool, and has
 *   no destructor (talloc cannot tell; the destination thread would run a
 *   destructor or update a pool header);
 * - talloc null tracking must be disabled, by calling
 *   talloc_disable_null_tracking() in main() before any thread starts:
 *   with null tracking on, every top-level chunk hangs off one global
 *   context that talloc does not lock. evproxy_msg_new() allocates a
 *   conforming message and fails (EINVAL) while null tracking is on.
 *
 * On success of a send the message belongs to the destination and the
 * sender's pointer is set to NULL; on ANY error the sender still owns it,
 * untouched. In the handler the message belongs to the destination loop:
 * talloc_steal() it to keep it, otherwise it is freed when the handler
 * returns.
 *
 * @{
 */

struct evproxy;
struct evproxy_sender;

/** Configuration of an evproxy. */
struct evproxy_config {
	/**
	 * Maximum number of queued messages; a send to a full queue fails
	 * with EAGAIN (see evproxy_send_send() to wait instead). 0 (the
	 * default) means unbounded. A bounded queue allocates nothing per
	 * message; an unbounded one grows by doubling.
	 */
	size_t capacity;
	/**
	 * Maximum number of messages handled in one loop iteration before
	 * the loop serves its other events. Default 128; 0 is invalid.
	 */
	unsigned batch;
};

/** Statistics of an evproxy, see evproxy_get_stats(). */
struct evproxy_stats {
	/** messages delivered to handlers */
	uint64_t delivered;
	/** messages freed undelivered because the destination went away */
	uint64_t discarded;
	/** wake-ups of the destination written to the kernel (eventfd) */
	uint64_t kernel_wakeups;
	/** times the consumer drained a batch */
	uint64_t batches;
};

/** Message handler, run on the destination loop. */
typedef void (*evproxy_msg_handler_t)(struct tevent_context *ev, void *msg,
				      void *private_data);

/** Fill @p cfg with the defaults (unbounded, batch 128). Any thread. */
void evproxy_config_default(struct evproxy_config *cfg);

/**
 * Create an evproxy delivering to @p dest_ev. Destination owner thread.
 *
 * @param mem_ctx	talloc parent; talloc_free() destroys the evproxy:
 *			queued messages are freed, later sends fail with
 *			ECANCELED, waiting evproxy_send_send() requests fail
 *			with ECANCELED.
 * @param dest_ev	the destination loop (any backend)
 * @param cfg		NULL for the defaults
 * @return the evproxy, or NULL with errno EINVAL (NULL @p dest_ev, batch
 *         0), ENOMEM, or EMFILE/ENFILE.
 */
struct evproxy *evproxy_create(TALLOC_CTX *mem_ctx,
			       struct tevent_context *dest_ev,
			       const struct evproxy_config *cfg);

/**
 * Get a sending handle for other threads. Destination owner thread.
 * The handle stays valid after the evproxy is freed (sends then fail with
 * ECANCELED); release it with evproxy_sender_unref().
 * @return a new reference, or NULL with errno EINVAL.
 */
struct evproxy_sender *evproxy_sender(struct evproxy *p);

/** Take another reference. Any thread. @return @p s. */
struct evproxy_sender *evproxy_sender_ref(struct evproxy_sender *s);

/** Drop a reference; the last one frees the handle. Any thread. */
void evproxy_sender_unref(struct evproxy_sender *s);

/**
 * Send a message. Any thread; lock-free; no syscall unless the destination
 * loop is idle.
 *
 * @param s		a sender handle
 * @param handler	run on the destination loop with the message
 * @param private_data	passed to @p handler (not owned by evproxy)
 * @param pmsg		address of the caller's pointer to the message, as
 *			with talloc_move(); set to NULL on success
 * @return 0 (ownership moved), EAGAIN (bounded queue full), ECANCELED
 *         (destination gone, or the evproxy was inherited across fork():
 *         it is dead in the child), ENOMEM (an unbounded queue could not
 *         grow), or EINVAL (NULL argument, NULL message, or a message
 *         that breaks the ownership rules: it has a parent, such as the
 *         null context that every chunk allocated while null tracking is
 *         on has, or it has talloc references). A chunk allocated before
 *         null tracking was turned on is not linked into the null context
 *         and moves safely. On every error the caller still owns the
 *         message, untouched.
 */
int evproxy_send(struct evproxy_sender *s, evproxy_msg_handler_t handler,
		 void *private_data, void *pmsg);

/**
 * Send with backpressure: completes once the message is queued, waiting on
 * the sender's own loop @p ev while the queue is full (the destination
 * wakes @p ev through a doorbell when space appears). Thread of @p ev.
 *
 * The caller's pointer *@p pmsg must stay valid until the request
 * completes or is freed: it is set to NULL when the message is queued, and
 * left untouched (the caller still owns the message) on error or when the
 * request is freed before completion.
 *
 * @return the request, or NULL (ENOMEM). Errors are reported by
 *         evproxy_send_recv(): the errors of evproxy_send() except EAGAIN.
 */
struct tevent_req *evproxy_send_send(TALLOC_CTX *mem_ctx,
				     struct tevent_context *ev,
				     struct evproxy_sender *s,
				     evproxy_msg_handler_t handler,
				     void *private_data, void *pmsg);

/** @return 0 once queued, or an errno value. */
int evproxy_send_recv(struct tevent_req *req);

/**
 * Allocate a message that follows the ownership rules: a zeroed top-level
 * talloc chunk of @p size bytes named @p name. Any thread.
 * @return the message, or NULL with errno ENOMEM, or EINVAL when talloc
 *         null tracking is enabled (see above).
 */
void *evproxy_msg_new(size_t size, const char *name);

/**
 * Read the statistics of an evproxy. Destination owner thread.
 * @return 0 or EINVAL.
 */
int evproxy_get_stats(struct evproxy *p, struct evproxy_stats *st);

/** @} */

/**
 * @defgroup evproxy_thread_proxy tevent_thread_proxy drop-in
 *
 * The same contract as tevent_thread_proxy_create() and
 * tevent_thread_proxy_schedule(): a program switches by renaming the two
 * calls. Differences: FIFO order per sending thread (tevent delivers a
 * batch in reverse), no syscall and no lock per message, and the handler
 * is called directly from the proxy's delivery (not as a scheduled
 * immediate), so @p im is not scheduled when the handler runs. As with
 * tevent, the proxy belongs to the destination and senders must not use it
 * after the destination context is freed; use evproxy_sender() handles
 * where that cannot be guaranteed.
 *
 * @{
 */

struct evproxy_thread_proxy;

/**
 * Create a drop-in thread proxy as a talloc child of @p dest_ev.
 * Destination owner thread.
 * @return the proxy, or NULL with errno set (EINVAL, ENOMEM, EMFILE).
 */
struct evproxy_thread_proxy *evproxy_thread_proxy_create(
	struct tevent_context *dest_ev);

/**
 * Have @p handler run on the destination with *@p pp_im and the pointer
 * in *@p pp_private_data, whose ownership moves to the library (both are
 * talloc chunks of the calling thread or the NULL context; both pointers
 * are set to NULL). They are freed after the handler returns unless the
 * handler talloc_steal()s them. On error (NULL arguments aside) they are
 * freed, as tevent does. Any thread.
 *
 * An immediate the handler left alone (not stolen, freed or scheduled
 * again; no children, destructor or reference added) is freed later, by
 * the next evproxy_thread_proxy_schedule() on the proxy (on its calling
 * thread) or with the proxy: freeing it on the thread that allocated it
 * keeps the destination off that thread's allocator lock. Other
 * immediates are freed on the destination after the handler. A destructor
 * set on the immediate before sending is replaced, and a schedule it still
 * has is cancelled, as with tevent. A handler may free the proxy while
 * its sender is still inside this call.
 */
void evproxy_thread_proxy_schedule(struct evproxy_thread_proxy *tp,
				   struct tevent_immediate **pp_im,
				   tevent_immediate_handler_t handler,
				   void *pp_private_data);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* EVPROXY_H */
