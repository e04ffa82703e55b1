/*
 * evproxy_pool: blocking work on worker threads, completed as tevent
 * requests on the caller's loop.
 *
 * Copyright (C) 2026 The evproxy authors
 *
 * This library is free software; you can redistribute it and/or modify it
 * under the terms of the GNU Lesser General Public License as published by
 * the Free Software Foundation; either version 3 of the License, or (at
 * your option) any later version.  See COPYING.
 */

#ifndef EVPROXY_POOL_H
#define EVPROXY_POOL_H

#include <stdbool.h>
#include <talloc.h>
#include <tevent.h>

#include "evpoll.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * @defgroup evproxy_pool Worker-thread pool
 *
 * The public counterpart of Samba's private pthreadpool_tevent: a function
 * runs on one of a fixed set of worker threads, and its completion is
 * reported as a tevent_req on the loop of the thread that submitted it.
 * Any number of loops on any number of threads may share one pool.
 *
 * Jobs wait in one FIFO queue shared by all workers, so a long job never
 * holds up others while a worker is idle. A submission wakes an idle
 * worker by ringing its doorbell (no syscall while that worker's evpoll
 * loop spins); completions travel back as evproxy messages (no syscall
 * while the caller's loop is busy or spinning).
 *
 * talloc null tracking must be disabled (talloc_disable_null_tracking() in
 * main(), before any thread starts), as for every evproxy message.
 *
 * @{
 */

struct evproxy_pool;

/** Configuration of a pool, see evproxy_pool_config_default(). */
struct evproxy_pool_config {
	/**
	 * Run the workers on evpoll loops (see evpoll.h): after each job a
	 * worker spins for evpoll_cfg.spin_ns before it sleeps, so the next
	 * job starts without a kernel wake-up, at the price of CPU time.
	 * Default false: the workers sleep on epoll loops.
	 */
	bool evpoll;
	/** The workers' evpoll configuration when @c evpoll is true. */
	struct evpoll_config evpoll_cfg;
};

/**
 * Fill @p cfg with the defaults: epoll workers, and evpoll_cfg from
 * evpoll_config_default(). Any thread.
 */
void evproxy_pool_config_default(struct evproxy_pool_config *cfg);

/**
 * Start a pool of @p nthreads workers, each running its own tevent loop.
 * Returns once every worker is ready. The workers block all signals, so
 * signals go to the application's own threads. Any thread.
 *
 * @param mem_ctx	talloc parent. talloc_free() of the pool (any thread
 *			but a worker, i.e. not from a job function, and not
 *			while another thread calls evproxy_pool_job_send()
 *			on it) shuts it down: jobs not yet started complete
 *			with ECANCELED and never run, running jobs finish
 *			(their requests complete normally), then every
 *			worker is joined. The completions are delivered when
 *			the callers' loops run next; freeing the pool does
 *			not wait for that.
 * @param nthreads	number of workers, 1 to 1024
 * @param cfg		NULL for the defaults
 * @return the pool, or NULL with errno EINVAL (@p nthreads out of range,
 *         invalid evpoll configuration), ENOMEM, EAGAIN (no thread), or the
 *         error of a worker's loop creation (such as EMFILE); nothing is
 *         left behind on failure.
 */
struct evproxy_pool *evproxy_pool_create(TALLOC_CTX *mem_ctx,
					 unsigned nthreads,
					 const struct evproxy_pool_config *cfg);

/**
 * Run @p fn(@p private_data) on a worker thread. Thread of @p ev; several
 * threads may submit to one pool at the same time, each with its own loop.
 *
 * @p fn may block; it must not touch @p ev or free the pool. The pool never
 * dereferences or frees @p private_data; it must stay valid while @p fn
 * may run, that is until the request completes, or, if the request is
 * freed first, until @p fn has returned (so do not free a request together
 * with the data its running job uses: keep such data alive until the
 * request completes, as examples/echo-server.c does).
 *
 * Freeing the request before the job has started means @p fn never runs.
 * Freeing it later is safe too: @p fn finishes, its result is discarded,
 * and the pool touches the request no more.
 *
 * If @p ev is freed while the request is pending, the request never
 * completes (free it); jobs not yet started are then dropped without
 * running, running jobs finish.
 *
 * The first submission from a loop creates, on that loop, the evproxy that
 * receives its completions; it lives until the loop or the pool goes.
 * (It keeps the loop busy: tevent_loop_wait() returns only after the pool
 * is freed and its last completions on that loop are delivered.)
 *
 * @param mem_ctx	talloc parent of the request
 * @param ev		the caller's loop, where the request completes
 * @return the request, or NULL with errno EINVAL (NULL @p ev) or ENOMEM.
 *         Other errors are reported through the request: EINVAL (NULL
 *         @p pool or @p fn), ECANCELED (the pool is shutting down), ENOMEM,
 *         or the error of creating the completion evproxy on @p ev.
 */
struct tevent_req *evproxy_pool_job_send(TALLOC_CTX *mem_ctx,
					 struct tevent_context *ev,
					 struct evproxy_pool *pool,
					 void (*fn)(void *private_data),
					 void *private_data);

/**
 * Collect the result of evproxy_pool_job_send(). Thread of the request.
 * @return 0 (@p fn ran), ECANCELED (the pool was freed before @p fn
 *         started: @p fn did not run), or another errno value (EINVAL,
 *         ENOMEM, ... : @p fn did not run).
 */
int evproxy_pool_job_recv(struct tevent_req *req);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* EVPROXY_POOL_H */
