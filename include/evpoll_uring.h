/*
 * evpoll_uring: io_uring completions delivered on a tevent loop.
 *
 * Copyright (C) 2026 The evproxy authors
 *
 * This library is free software; you can redistribute it and/or modify it
 * under the terms of the GNU Lesser General Public License as published by
 * the Free Software Foundation; either version 3 of the License, or (at
 * your option) any later version.  See COPYING.
 */

#ifndef EVPOLL_URING_H
#define EVPOLL_URING_H

#include <stdbool.h>
#include <stdint.h>
#include <liburing.h>
#include <talloc.h>
#include <tevent.h>

#include "evpoll.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * @defgroup evpoll_uring The io_uring completion adapter
 *
 * An adapter delivers the completions (CQEs) of one io_uring to a handler
 * on the ring's tevent loop, on any tevent backend:
 *
 * - while the loop sleeps, through an eventfd registered on the ring
 *   (io_uring_register_eventfd()) and watched by a tevent_fd;
 * - while an evpoll loop spins, through a poll callback that reaps the
 *   completion queue directly, with the eventfd muted
 *   (IORING_CQ_EVENTFD_DISABLED) so the kernel does no wake-up work.
 *
 * When the loop stops spinning the adapter re-enables the eventfd, then
 * reaps what is already in the queue: the kernel signals the eventfd for
 * every CQE posted after the re-enable, the reap catches every CQE posted
 * before it, so no CQE is lost; a CQE is marked seen before its handler
 * runs, so none is delivered twice (see evpoll_uring(3)).
 *
 * @code
 *	static void on_cqe(struct tevent_context *ev,
 *			   struct io_uring_cqe *cqe, void *private_data)
 *	{
 *		struct request *req = io_uring_cqe_get_data(cqe);
 *
 *		request_done(req, cqe->res);
 *	}
 *
 *	u = evpoll_uring_attach(ev, mem_ctx, &ring, on_cqe, NULL);
 *	evpoll_uring_set_pin_inflight(u, true);
 *	sqe = io_uring_get_sqe(&ring);
 *	io_uring_prep_read(sqe, fd, buf, len, offset);
 *	io_uring_sqe_set_data(sqe, req);
 *	evpoll_uring_submit(u);
 * @endcode
 *
 * Thread safety: an adapter, its ring and its tevent context belong to one
 * thread, the owner of the context. Call every function on that thread. The
 * ring's submission and completion queues are driven by that thread only
 * (liburing's queues are single-producer, single-consumer); other threads
 * may post completions into the ring through IORING_OP_MSG_RING from their
 * own rings.
 *
 * @{
 */

/**
 * Completion handler.
 *
 * @param ev		the adapter's tevent context
 * @param cqe		a copy of the CQE, valid only during the call (for
 *			IORING_SETUP_CQE32 rings it includes big_cqe[]); the
 *			CQE has already been marked seen in the ring
 * @param private_data	as given to evpoll_uring_attach()
 *
 * The handler may submit new requests, free the adapter (then no further
 * CQE is delivered by this adapter, and the CQEs not yet delivered stay in
 * the ring for the caller) and run a nested event loop, also one that
 * waits for further CQEs of this ring (they are delivered in the nested
 * loop); it must not reap the ring itself.
 */
typedef void (*evpoll_cqe_fn)(struct tevent_context *ev,
			      struct io_uring_cqe *cqe,
			      void *private_data);

struct evpoll_uring;

/** Statistics of an adapter, see evpoll_uring_get_stats(). */
struct evpoll_uring_stats {
	/** CQEs delivered to the handler, by all paths below */
	uint64_t cqes;
	/** ... by the poll callback of a spinning evpoll loop */
	uint64_t cqes_polled;
	/** ... by the eventfd handler, or in a loop nested in the handler */
	uint64_t cqes_eventfd;
	/** ... by the drain that runs when the loop stops spinning */
	uint64_t cqes_drained;
	/** runs of the eventfd handler */
	uint64_t eventfd_wakeups;
	/** SQEs submitted through evpoll_uring_submit() */
	uint64_t submitted;
	/** requests counted as in flight now, see evpoll_uring_submit() */
	uint64_t inflight;
};

/**
 * Deliver the CQEs of @p ring to @p handler on the loop @p ev.
 *
 * Registers a new eventfd on the ring, watches it with a tevent_fd and, on
 * an evpoll context, adds a poll callback (evpoll_add_poll()). CQEs already
 * in the ring are delivered at the next loop iteration. While attached,
 * only the adapter consumes the ring's completion queue.
 *
 * Free the adapter with talloc_free() (also from inside the handler): it
 * unregisters and closes the eventfd, re-enables eventfd notification and
 * drops its pin. The ring stays the caller's; free the adapter before
 * io_uring_queue_exit(). If the tevent context is freed first, the adapter
 * stays valid but delivers nothing. Owner thread.
 *
 * @param ev		the loop; any tevent backend
 * @param mem_ctx	talloc parent of the adapter
 * @param ring		an initialised ring without IORING_SETUP_IOPOLL.
 *			With IORING_SETUP_DEFER_TASKRUN, the adapter runs
 *			the ring's task work (io_uring_get_events()); add
 *			IORING_SETUP_TASKRUN_FLAG, or a spinning loop enters
 *			the kernel on every idle poll pass to look for it.
 * @param handler	called for every CQE
 * @param private_data	passed to @p handler
 * @return the adapter, or NULL with errno: EINVAL (NULL argument, ring not
 *         initialised, IOPOLL ring), EBUSY (the ring already has an
 *         eventfd, for example another adapter's), ENOMEM, or the error of
 *         eventfd() or io_uring_register_eventfd().
 */
struct evpoll_uring *evpoll_uring_attach(struct tevent_context *ev,
					 TALLOC_CTX *mem_ctx,
					 struct io_uring *ring,
					 evpoll_cqe_fn handler,
					 void *private_data);

/**
 * Submit the ring's prepared SQEs (io_uring_submit()) and count them as
 * requests in flight.
 *
 * The adapter counts one request per SQE submitted and decrements the
 * count for every CQE it delivers without IORING_CQE_F_MORE (the final CQE
 * of a multishot request, or the notification of a zero-copy send, ends
 * it). The count never goes below zero: a CQE nobody submitted here (an
 * IORING_OP_MSG_RING arrival, a request submitted with io_uring_submit())
 * may end the count early. The count only decides the pin (see
 * evpoll_uring_set_pin_inflight()); delivery never depends on it. Owner
 * thread.
 *
 * @return the number of SQEs submitted, or a negative errno value:
 *         -EINVAL for a NULL adapter, or the error of io_uring_submit().
 */
int evpoll_uring_submit(struct evpoll_uring *u);

/**
 * Adjust the in-flight count by @p delta: > 0 for requests submitted by
 * other means (io_uring_submit_and_wait(), ...), < 0 for requests that will
 * post no final CQE (IOSQE_CQE_SKIP_SUCCESS) or for unsolicited CQEs the
 * handler recognises. The count is clamped at zero. Owner thread.
 *
 * @return 0, or EINVAL for a NULL adapter.
 */
int evpoll_uring_add_inflight(struct evpoll_uring *u, int delta);

/**
 * Keep an evpoll loop spinning while requests are in flight.
 *
 * When enabled, the adapter holds one evpoll_pin() on its context while
 * its in-flight count is above zero and drops it when the count reaches
 * zero, when this option is disabled, or when the adapter is freed, so
 * pins stay balanced. The completion is then reaped by the spinning loop
 * instead of waking it through the kernel: lower latency for fast devices,
 * at the price of a busy CPU while a request is outstanding. No effect on a
 * non-evpoll context or in EVPOLL_MODE_NEVER. Default: disabled. Owner
 * thread.
 *
 * @return 0, or EINVAL for a NULL adapter.
 */
int evpoll_uring_set_pin_inflight(struct evpoll_uring *u, bool pin);

/**
 * Read the statistics of an adapter. Owner thread.
 * @return 0, or EINVAL (NULL argument).
 */
int evpoll_uring_get_stats(struct evpoll_uring *u,
			   struct evpoll_uring_stats *st);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* EVPOLL_URING_H */
