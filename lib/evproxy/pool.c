/*
 * evproxy_pool: blocking work on worker threads, completion as a tevent_req
 * on the caller's loop, built on doorbells and evproxy messages only.
 *
 * Copyright (C) 2026 The evproxy authors
 *
 * This library is free software; you can redistribute it and/or modify it
 * under the terms of the GNU Lesser General Public License as published by
 * the Free Software Foundation; either version 3 of the License, or (at
 * your option) any later version.  See COPYING.
 *
 * Design
 *
 * Submission: one FIFO queue of jobs under a mutex (core->lock), shared by
 * all workers, plus a stack of idle workers. evproxy_pool_job_send()
 * appends the job and, if a worker is idle, pops it and rings its doorbell.
 * A worker takes jobs until the queue is empty, then pushes itself back on
 * the idle stack under the same lock, so no wake-up is lost. A shared
 * queue rather than one evproxy inbox per worker: with per-worker inboxes
 * a job placed behind a long-running one waits while other workers idle,
 * which is what a pool for blocking work must not do. The mutex also makes
 * cancellation exact and cheap: a request freed while its job is queued
 * unlinks the job, which then never runs.
 *
 * Completion: the worker sends a preallocated message (struct pool_reply,
 * allocated by the submitter, so a worker never fails for lack of memory)
 * to the caller's "endpoint", an evproxy on the caller's loop. There is one
 * endpoint per (pool, loop), created by the first submission from that
 * loop and found through a list under core->lock; never one per job.
 *
 * Lifetimes. A job (malloc, any thread may free it) has two references:
 * - the "worker" one, held by the queue, then by whoever took the job (a
 *   worker, or the pool's destructor cancelling it), dropped once the
 *   completion was sent (or the job was unlinked by a cancellation);
 * - the "caller" one, held by the endpoint's list of awaited jobs
 *   (ep->jobs, caller thread only), dropped by the completion handler, by a
 *   cancellation, or by the endpoint's destructor when the loop goes.
 * The completion message carries only a pointer to the job and owns
 * nothing: when the caller's loop is freed the evproxy discards queued
 * messages, which then costs nothing and leaks nothing, and a message is
 * only delivered while the endpoint, hence its reference, is alive. The
 * request and the job point at each other; both pointers are touched on
 * the caller's thread only, and are cleared by whichever of request free,
 * completion and endpoint destruction comes first.
 *
 * job->state (under core->lock) decides the race between a worker taking a
 * job and its request being freed: QUEUED -> TAKEN (a worker or shutdown
 * took it; it will complete) or QUEUED -> CANCELLED (unlinked; never runs).
 *
 * Shutdown (the pool's destructor): under the lock set 'stopping' (later
 * submissions fail with ECANCELED, workers stop taking jobs) and detach the
 * queue; complete every detached job with ECANCELED; ring every worker's
 * doorbell and join it. A worker's loop holds nothing but its doorbell, so
 * it exits as soon as it sees 'stopping'. The shared part (core: lock,
 * queue, endpoint list) is refcounted: endpoints may outlive the pool. The
 * destructor finally sends each endpoint a "closed" message; the endpoint
 * frees itself (and its evproxy, so tevent_loop_wait() can return) once
 * the completions it awaits have arrived.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "req_errno.h"
#include "evpoll.h"
#include "evproxy.h"
#include "evproxy_pool.h"
#include "visibility.h"

#define POOL_MAX_THREADS 1024

enum job_state {
	JOB_QUEUED,	/* in core's queue */
	JOB_TAKEN,	/* taken by a worker or by shutdown: will complete */
	JOB_CANCELLED,	/* unlinked by its request or its endpoint */
};

struct pool_endpoint;

struct pool_job {
	/* acq_rel decrements: the last owner sees every other use */
	atomic_uint refs;

	/* set before the job is queued, then read-only */
	void (*fn)(void *private_data);
	void *private_data;
	struct pool_endpoint *ep;
	struct evproxy_sender *reply_to;	/* a reference of our own */

	/* the completion message; moved out by whoever completes the job */
	struct pool_reply *reply;
	/* written before the completion is sent, read after delivery */
	int result;

	/* under core->lock */
	enum job_state state;
	struct pool_job *q_prev, *q_next;

	/* caller thread only */
	struct tevent_req *req;
	struct pool_job *ep_prev, *ep_next;
	bool unlinked_by_ep;
};

/* The completion message (evproxy_msg_new: a top-level chunk). */
struct pool_reply {
	struct pool_job *job;
};

/* The "pool closed" message to an endpoint. */
struct pool_closed {
	char unused;
};

/* The part that endpoints share with the pool; malloc, refcounted. */
struct pool_core {
	pthread_mutex_t lock;
	atomic_uint refs;
	/* under lock */
	bool stopping;
	struct pool_job *q_head, *q_tail;
	struct pool_endpoint *eps;
	unsigned *idle;		/* stack of idle worker indexes */
	unsigned nidle;
};

/* One per (pool, caller loop): a talloc child of the caller's loop. */
struct pool_endpoint {
	struct pool_core *core;			/* a reference */
	struct tevent_context *ev;		/* read under core->lock */
	struct pool_endpoint *prev, *next;	/* core->eps, under lock */
	struct evproxy *proxy;
	struct evproxy_sender *sender;		/* a reference */
	/* caller thread only: jobs whose completion is awaited */
	struct pool_job *jobs_head, *jobs_tail;
	bool closing;				/* the pool is gone */
};

struct pool_worker {
	struct evproxy_pool *pool;
	unsigned idx;
	pthread_t thread;
	bool started;		/* pool thread */
	bool idle;		/* under core->lock */
	int init_err;		/* under core->lock, until ready */
	bool ready;		/* under core->lock */
	bool exit;		/* worker thread */
	struct evproxy_ringer *ringer;	/* set under core->lock, then fixed */
};

struct evproxy_pool {
	struct pool_core *core;
	struct evproxy_pool_config cfg;
	unsigned nthreads;
	struct pool_worker *workers;
	pthread_cond_t ready_cond;	/* with core->lock */
};

/* The state of an evproxy_pool_job_send() request. */
struct pool_job_state {
	struct pool_job *job;
};

static void core_unref(struct pool_core *core)
{
	if (atomic_fetch_sub_explicit(&core->refs, 1, memory_order_acq_rel) !=
	    1) {
		return;
	}
	pthread_mutex_destroy(&core->lock);
	free(core->idle);
	free(core);
}

static void job_unref(struct pool_job *job)
{
	if (atomic_fetch_sub_explicit(&job->refs, 1, memory_order_acq_rel) !=
	    1) {
		return;
	}
	talloc_free(job->reply);	/* a top-level chunk: any thread */
	evproxy_sender_unref(job->reply_to);
	free(job);
}

/* core's queue, under core->lock */
static void queue_append(struct pool_core *core, struct pool_job *job)
{
	job->q_next = NULL;
	job->q_prev = core->q_tail;
	if (core->q_tail != NULL) {
		core->q_tail->q_next = job;
	} else {
		core->q_head = job;
	}
	core->q_tail = job;
}

static void queue_unlink(struct pool_core *core, struct pool_job *job)
{
	if (job->q_prev != NULL) {
		job->q_prev->q_next = job->q_next;
	} else {
		core->q_head = job->q_next;
	}
	if (job->q_next != NULL) {
		job->q_next->q_prev = job->q_prev;
	} else {
		core->q_tail = job->q_prev;
	}
	job->q_prev = NULL;
	job->q_next = NULL;
}

/* an endpoint's awaited jobs, caller thread */
static void ep_jobs_append(struct pool_endpoint *ep, struct pool_job *job)
{
	job->ep_next = NULL;
	job->ep_prev = ep->jobs_tail;
	if (ep->jobs_tail != NULL) {
		ep->jobs_tail->ep_next = job;
	} else {
		ep->jobs_head = job;
	}
	ep->jobs_tail = job;
}

static void ep_jobs_unlink(struct pool_endpoint *ep, struct pool_job *job)
{
	if (job->ep_prev != NULL) {
		job->ep_prev->ep_next = job->ep_next;
	} else {
		ep->jobs_head = job->ep_next;
	}
	if (job->ep_next != NULL) {
		job->ep_next->ep_prev = job->ep_prev;
	} else {
		ep->jobs_tail = job->ep_prev;
	}
	job->ep_prev = NULL;
	job->ep_next = NULL;
}

/* Forget the request of a job (and the job of the request). Caller. */
static void job_detach_req(struct pool_job *job)
{
	struct pool_job_state *st;

	if (job->req == NULL) {
		return;
	}
	st = tevent_req_data(job->req, struct pool_job_state);
	st->job = NULL;
	job->req = NULL;
}

/* After the pool is gone, an endpoint lives until its last completion. */
static void ep_maybe_close(struct pool_endpoint *ep)
{
	if (ep->closing && ep->jobs_head == NULL) {
		talloc_free(ep);
	}
}

/* Caller's loop: a job completed (or was cancelled by shutdown). */
static void reply_handler(struct tevent_context *ev, void *msg,
			  void *private_data)
{
	struct pool_endpoint *ep = private_data;
	struct pool_reply *reply = msg;
	struct pool_job *job = reply->job;
	struct tevent_req *req = job->req;
	int result = job->result;

	/* all bookkeeping first: the request's callback may free anything */
	ep_jobs_unlink(ep, job);
	job_detach_req(job);
	job_unref(job);
	ep_maybe_close(ep);
	if (req == NULL) {
		return;		/* the request was freed while the job ran */
	}
	if (result != 0) {
		tevent_req_error(req, result);
	} else {
		tevent_req_done(req);
	}
}

/* Caller's loop: the pool was freed. */
static void closed_handler(struct tevent_context *ev, void *msg,
			   void *private_data)
{
	struct pool_endpoint *ep = private_data;

	ep->closing = true;
	ep_maybe_close(ep);
}

/*
 * The caller's loop (or the endpoint) goes: jobs still queued are dropped,
 * running ones finish and their completions are discarded with the evproxy.
 */
static int ep_destructor(struct pool_endpoint *ep)
{
	struct pool_core *core = ep->core;
	struct pool_job *job, *next;

	pthread_mutex_lock(&core->lock);
	if (ep->prev != NULL) {
		ep->prev->next = ep->next;
	} else {
		core->eps = ep->next;
	}
	if (ep->next != NULL) {
		ep->next->prev = ep->prev;
	}
	for (job = ep->jobs_head; job != NULL; job = job->ep_next) {
		if (job->state == JOB_QUEUED) {
			queue_unlink(core, job);
			job->state = JOB_CANCELLED;
			job->unlinked_by_ep = true;
		}
	}
	pthread_mutex_unlock(&core->lock);

	for (job = ep->jobs_head; job != NULL; job = next) {
		next = job->ep_next;
		ep_jobs_unlink(ep, job);
		job_detach_req(job);
		if (job->unlinked_by_ep) {
			job_unref(job);		/* the queue's reference */
		}
		job_unref(job);			/* ours */
	}
	evproxy_sender_unref(ep->sender);
	core_unref(core);
	return 0;
}

/*
 * Find or create the endpoint for @p ev; returns with core->lock held on
 * success. Caller thread.
 */
static int ep_get_locked(struct evproxy_pool *pool, struct tevent_context *ev,
			 struct pool_endpoint **pep)
{
	struct pool_core *core = pool->core;
	struct pool_endpoint *ep;
	int err;

	pthread_mutex_lock(&core->lock);
	for (ep = core->eps; ep != NULL; ep = ep->next) {
		if (ep->ev == ev) {
			*pep = ep;
			return 0;
		}
	}
	pthread_mutex_unlock(&core->lock);

	/* first submission from this loop: no other thread uses ev */
	ep = talloc_zero(ev, struct pool_endpoint);
	if (ep == NULL) {
		return ENOMEM;
	}
	ep->ev = ev;
	ep->proxy = evproxy_create(ep, ev, NULL);
	if (ep->proxy == NULL) {
		err = errno;
		talloc_free(ep);
		return err;
	}
	ep->sender = evproxy_sender(ep->proxy);
	if (ep->sender == NULL) {
		err = errno;
		talloc_free(ep);
		return err;
	}
	ep->core = core;
	atomic_fetch_add_explicit(&core->refs, 1, memory_order_relaxed);
	talloc_set_destructor(ep, ep_destructor);

	pthread_mutex_lock(&core->lock);
	ep->next = core->eps;
	if (core->eps != NULL) {
		core->eps->prev = ep;
	}
	core->eps = ep;
	*pep = ep;
	return 0;
}

/* Send a job's completion and drop the taker's reference. Any thread. */
static void job_complete(struct pool_job *job, int result)
{
	struct pool_reply *reply = job->reply;
	int ret;

	job->reply = NULL;
	job->result = result;
	ret = evproxy_send(job->reply_to, reply_handler, job->ep, &reply);
	if (ret != 0) {
		/*
		 * ECANCELED: the caller's loop is gone, its endpoint dropped
		 * the job. (ENOMEM, an unbounded queue that cannot grow,
		 * would leave the request pending until its loop goes.)
		 */
		talloc_free(reply);
	}
	job_unref(job);
}

/* Worker loop: the doorbell rang (work queued, or shutdown). */
static void worker_ring(struct tevent_context *ev, struct evproxy_doorbell *db,
			uint64_t rings, void *private_data)
{
	struct pool_worker *w = private_data;
	struct pool_core *core = w->pool->core;
	struct pool_job *job;

	for (;;) {
		pthread_mutex_lock(&core->lock);
		if (core->stopping) {
			pthread_mutex_unlock(&core->lock);
			w->exit = true;
			return;
		}
		job = core->q_head;
		if (job == NULL) {
			/* the next submission rings us again */
			if (!w->idle) {
				w->idle = true;
				core->idle[core->nidle++] = w->idx;
			}
			pthread_mutex_unlock(&core->lock);
			return;
		}
		queue_unlink(core, job);
		job->state = JOB_TAKEN;
		pthread_mutex_unlock(&core->lock);

		job->fn(job->private_data);
		job_complete(job, 0);
	}
}

static void *worker_main(void *arg)
{
	struct pool_worker *w = arg;
	struct evproxy_pool *pool = w->pool;
	struct pool_core *core = pool->core;
	struct tevent_context *ev;
	struct evproxy_doorbell *db = NULL;
	struct evproxy_ringer *ringer = NULL;
	int err = 0;

	if (pool->cfg.evpoll) {
		ev = evpoll_context_init(NULL, &pool->cfg.evpoll_cfg);
	} else {
		ev = tevent_context_init_byname(NULL, "epoll");
	}
	if (ev == NULL) {
		err = errno != 0 ? errno : ENOMEM;
	}
	if (err == 0) {
		db = evproxy_add_doorbell(ev, ev, worker_ring, w);
		if (db == NULL) {
			err = errno;
		}
	}
	if (err == 0) {
		ringer = evproxy_doorbell_ringer(db);
		if (ringer == NULL) {
			err = errno;
		}
	}

	pthread_mutex_lock(&core->lock);
	w->ringer = ringer;
	w->init_err = err;
	w->ready = true;
	if (err == 0) {
		w->idle = true;
		core->idle[core->nidle++] = w->idx;
	}
	pthread_cond_broadcast(&pool->ready_cond);
	pthread_mutex_unlock(&core->lock);

	while (err == 0 && !w->exit) {
		tevent_loop_once(ev);
	}
	talloc_free(ev);	/* the doorbell; ringers then get ECANCELED */
	return NULL;
}

static int pool_destructor(struct evproxy_pool *pool)
{
	struct pool_core *core = pool->core;
	struct pool_job *job, *next;
	struct pool_endpoint *ep;
	unsigned i;

	/* stop taking jobs; whatever is queued completes with ECANCELED */
	pthread_mutex_lock(&core->lock);
	core->stopping = true;
	job = core->q_head;
	core->q_head = NULL;
	core->q_tail = NULL;
	for (next = job; next != NULL; next = next->q_next) {
		next->state = JOB_TAKEN;
	}
	pthread_mutex_unlock(&core->lock);
	for (; job != NULL; job = next) {
		next = job->q_next;
		job_complete(job, ECANCELED);
	}

	for (i = 0; i < pool->nthreads; i++) {
		struct pool_worker *w = &pool->workers[i];

		if (w->started && w->ringer != NULL) {
			evproxy_ringer_ring(w->ringer);
		}
	}
	for (i = 0; i < pool->nthreads; i++) {
		if (pool->workers[i].started) {
			pthread_join(pool->workers[i].thread, NULL);
		}
		evproxy_ringer_unref(pool->workers[i].ringer);
	}
	pthread_cond_destroy(&pool->ready_cond);

	/*
	 * Tell the endpoints: each frees itself (and its evproxy) once the
	 * completions it awaits are delivered. Under the lock, so an
	 * endpoint's destructor cannot drop its sender meanwhile.
	 */
	pthread_mutex_lock(&core->lock);
	for (ep = core->eps; ep != NULL; ep = ep->next) {
		struct pool_closed *msg = evproxy_msg_new(sizeof(*msg),
							  "struct pool_closed");

		if (msg == NULL) {
			continue;	/* it stays until its loop goes */
		}
		if (evproxy_send(ep->sender, closed_handler, ep, &msg) != 0) {
			talloc_free(msg);
		}
	}
	pthread_mutex_unlock(&core->lock);
	core_unref(core);
	return 0;
}

_PUBLIC_ void evproxy_pool_config_default(struct evproxy_pool_config *cfg)
{
	if (cfg == NULL) {
		return;
	}
	memset(cfg, 0, sizeof(*cfg));
	cfg->evpoll = false;
	evpoll_config_default(&cfg->evpoll_cfg);
}

_PUBLIC_ struct evproxy_pool *evproxy_pool_create(
	TALLOC_CTX *mem_ctx, unsigned nthreads,
	const struct evproxy_pool_config *cfg)
{
	struct evproxy_pool *pool;
	struct pool_core *core;
	sigset_t all, old;
	unsigned i;
	int err = 0;

	if (nthreads == 0 || nthreads > POOL_MAX_THREADS) {
		errno = EINVAL;
		return NULL;
	}
	/* tevent's one-time backend setup, before threads race for it */
	if (!evpoll_init()) {
		errno = ENOSYS;
		return NULL;
	}
	core = calloc(1, sizeof(*core));
	if (core == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	core->idle = calloc(nthreads, sizeof(core->idle[0]));
	if (core->idle == NULL || pthread_mutex_init(&core->lock, NULL) != 0) {
		free(core->idle);
		free(core);
		errno = ENOMEM;
		return NULL;
	}
	atomic_init(&core->refs, 1);

	pool = talloc_zero(mem_ctx, struct evproxy_pool);
	if (pool == NULL) {
		core_unref(core);
		errno = ENOMEM;
		return NULL;
	}
	pool->core = core;
	if (cfg != NULL) {
		pool->cfg = *cfg;
	} else {
		evproxy_pool_config_default(&pool->cfg);
	}
	pool->workers = talloc_zero_array(pool, struct pool_worker, nthreads);
	if (pool->workers == NULL ||
	    pthread_cond_init(&pool->ready_cond, NULL) != 0) {
		talloc_free(pool);
		core_unref(core);
		errno = ENOMEM;
		return NULL;
	}
	pool->nthreads = nthreads;
	/* from here on the destructor stops and joins what was started */
	talloc_set_destructor(pool, pool_destructor);

	/* workers inherit a full signal mask: signals go to our callers */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (i = 0; i < nthreads; i++) {
		struct pool_worker *w = &pool->workers[i];

		w->pool = pool;
		w->idx = i;
		err = pthread_create(&w->thread, NULL, worker_main, w);
		if (err != 0) {
			break;
		}
		w->started = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);

	pthread_mutex_lock(&core->lock);
	for (i = 0; i < nthreads; i++) {
		struct pool_worker *w = &pool->workers[i];

		while (w->started && !w->ready) {
			pthread_cond_wait(&pool->ready_cond, &core->lock);
		}
		if (err == 0 && w->init_err != 0) {
			err = w->init_err;
		}
	}
	pthread_mutex_unlock(&core->lock);
	if (err != 0) {
		talloc_free(pool);
		errno = err;
		return NULL;
	}
	return pool;
}

/* The request is freed: a queued job is unlinked and never runs. */
static int job_state_destructor(struct pool_job_state *st)
{
	struct pool_job *job = st->job;
	struct pool_endpoint *ep;
	bool cancelled;

	if (job == NULL) {
		return 0;
	}
	st->job = NULL;
	job->req = NULL;
	ep = job->ep;
	pthread_mutex_lock(&ep->core->lock);
	cancelled = job->state == JOB_QUEUED;
	if (cancelled) {
		queue_unlink(ep->core, job);
		job->state = JOB_CANCELLED;
	}
	pthread_mutex_unlock(&ep->core->lock);
	if (!cancelled) {
		/* taken: its completion arrives later and is dropped */
		return 0;
	}
	ep_jobs_unlink(ep, job);
	job_unref(job);		/* the queue's reference */
	job_unref(job);		/* the endpoint's */
	ep_maybe_close(ep);
	return 0;
}

_PUBLIC_ struct tevent_req *evproxy_pool_job_send(
	TALLOC_CTX *mem_ctx, struct tevent_context *ev,
	struct evproxy_pool *pool, void (*fn)(void *private_data),
	void *private_data)
{
	struct tevent_req *req;
	struct pool_job_state *st;
	struct pool_job *job;
	struct pool_endpoint *ep = NULL;
	struct pool_core *core;
	struct pool_worker *w = NULL;
	int ret;

	if (ev == NULL) {
		errno = EINVAL;
		return NULL;
	}
	req = tevent_req_create(mem_ctx, &st, struct pool_job_state);
	if (req == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	if (pool == NULL || fn == NULL) {
		tevent_req_error(req, EINVAL);
		return tevent_req_post(req, ev);
	}
	core = pool->core;

	job = calloc(1, sizeof(*job));
	if (tevent_req_nomem(job, req)) {
		return tevent_req_post(req, ev);
	}
	/* allocated here, so completing a job never needs memory */
	job->reply = evproxy_msg_new(sizeof(*job->reply), "struct pool_reply");
	if (job->reply == NULL) {
		ret = errno;
		free(job);
		tevent_req_error(req, ret);
		return tevent_req_post(req, ev);
	}
	job->reply->job = job;
	job->fn = fn;
	job->private_data = private_data;
	atomic_init(&job->refs, 2);	/* the queue's and the endpoint's */

	ret = ep_get_locked(pool, ev, &ep);
	if (ret != 0) {
		talloc_free(job->reply);
		free(job);
		tevent_req_error(req, ret);
		return tevent_req_post(req, ev);
	}
	/* core->lock is held */
	if (core->stopping) {
		pthread_mutex_unlock(&core->lock);
		talloc_free(job->reply);
		free(job);
		tevent_req_error(req, ECANCELED);
		return tevent_req_post(req, ev);
	}
	job->ep = ep;
	job->reply_to = evproxy_sender_ref(ep->sender);
	job->state = JOB_QUEUED;
	queue_append(core, job);
	if (core->nidle > 0) {
		w = &pool->workers[core->idle[--core->nidle]];
		w->idle = false;
	}
	pthread_mutex_unlock(&core->lock);

	job->req = req;
	st->job = job;
	ep_jobs_append(ep, job);
	talloc_set_destructor(st, job_state_destructor);
	if (w != NULL) {
		evproxy_ringer_ring(w->ringer);
	}
	return req;
}

_PUBLIC_ int evproxy_pool_job_recv(struct tevent_req *req)
{
	return evproxy_req_errno(req);
}
