/*
 * evproxy-bench: the worker-thread pool (evproxy_pool.h) against a
 * pthreadpool_tevent-style baseline, in the same run.
 *
 * The baseline does what Samba's pthreadpool_tevent does for each job: the
 * submitter appends the job to a mutex-protected queue and signals a
 * condition variable; the worker runs the function and hands the
 * completion back with tevent_threaded_schedule_immediate(); an immediate
 * on the caller's loop completes the tevent_req.
 *
 * Both sides use one worker thread, an epoll caller loop, empty jobs:
 * - *_rtt: one job at a time, submit to completion callback, p50/p99;
 * - *_jobs_per_s: JOBS_WINDOW jobs kept in flight, completed jobs/s,
 *   median of bench_repeats() runs.
 * pool_job_rtt_evpoll is the pool with evpoll caller and worker loops
 * (spinning instead of sleeping between jobs).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "bench.h"
#include "evpoll.h"
#include "evproxy.h"
#include "evproxy_pool.h"


#define JOBS_WINDOW 64

static void empty_job(void *private_data)
{
}

/* ---- the baseline: mutex + condvar queue, tevent threaded immediates ---- */

struct pp_job {
	struct pp_job *next;
	void (*fn)(void *private_data);
	void *private_data;
	struct tevent_threaded_context *tctx;
	struct tevent_immediate *im;
	struct tevent_req *req;
};

struct pp_pool {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct pp_job *head, *tail;
	bool stop;
	pthread_t thread;
	/* one caller loop in this benchmark, as pthreadpool_tevent caches */
	struct tevent_threaded_context *tctx;
};

static void pp_job_done(struct tevent_context *ev, struct tevent_immediate *im,
			void *private_data)
{
	tevent_req_done(private_data);
}

static void *pp_worker(void *arg)
{
	struct pp_pool *pp = arg;
	struct pp_job *job;

	for (;;) {
		pthread_mutex_lock(&pp->lock);
		while (pp->head == NULL && !pp->stop) {
			pthread_cond_wait(&pp->cond, &pp->lock);
		}
		job = pp->head;
		if (job == NULL) {
			pthread_mutex_unlock(&pp->lock);
			return NULL;
		}
		pp->head = job->next;
		if (pp->head == NULL) {
			pp->tail = NULL;
		}
		pthread_mutex_unlock(&pp->lock);

		job->fn(job->private_data);
		/* the job is the request's state: no access after this */
		tevent_threaded_schedule_immediate(job->tctx, job->im,
						   pp_job_done, job->req);
	}
}

static struct pp_pool *pp_create(struct tevent_context *ev)
{
	struct pp_pool *pp = calloc(1, sizeof(*pp));

	if (pp == NULL) {
		perror("calloc");
		exit(1);
	}
	pthread_mutex_init(&pp->lock, NULL);
	pthread_cond_init(&pp->cond, NULL);
	pp->tctx = tevent_threaded_context_create(NULL, ev);
	if (pp->tctx == NULL) {
		fprintf(stderr, "tevent_threaded_context_create failed\n");
		exit(1);
	}
	bench_thread_start(&pp->thread, 1, pp_worker, pp);
	return pp;
}

static void pp_destroy(struct pp_pool *pp)
{
	pthread_mutex_lock(&pp->lock);
	pp->stop = true;
	pthread_cond_signal(&pp->cond);
	pthread_mutex_unlock(&pp->lock);
	pthread_join(pp->thread, NULL);
	talloc_free(pp->tctx);
	pthread_mutex_destroy(&pp->lock);
	pthread_cond_destroy(&pp->cond);
	free(pp);
}

static struct tevent_req *pp_job_send(TALLOC_CTX *mem_ctx,
				      struct tevent_context *ev,
				      struct pp_pool *pp,
				      void (*fn)(void *private_data),
				      void *private_data)
{
	struct tevent_req *req;
	struct pp_job *job;

	req = tevent_req_create(mem_ctx, &job, struct pp_job);
	if (req == NULL) {
		return NULL;
	}
	job->fn = fn;
	job->private_data = private_data;
	job->tctx = pp->tctx;
	job->req = req;
	job->im = tevent_create_immediate(job);
	if (tevent_req_nomem(job->im, req)) {
		return tevent_req_post(req, ev);
	}
	pthread_mutex_lock(&pp->lock);
	if (pp->tail != NULL) {
		pp->tail->next = job;
	} else {
		pp->head = job;
	}
	pp->tail = job;
	pthread_cond_signal(&pp->cond);
	pthread_mutex_unlock(&pp->lock);
	return req;
}

static int pp_job_recv(struct tevent_req *req)
{
	enum tevent_req_state state;
	uint64_t err;

	if (tevent_req_is_error(req, &state, &err)) {
		return state == TEVENT_REQ_USER_ERROR ? (int)err : ENOMEM;
	}
	return 0;
}

/* ---- the same scenarios for both ---------------------------------------- */

struct side {
	struct tevent_context *ev;
	struct evproxy_pool *pool;	/* or */
	struct pp_pool *pp;
	/* throughput run */
	uint64_t sent, done, total;
	bool failed;
};

static void side_done(struct tevent_req *req);

static void side_submit(struct side *s)
{
	struct tevent_req *req;

	if (s->pool != NULL) {
		req = evproxy_pool_job_send(s->ev, s->ev, s->pool, empty_job,
					    NULL);
	} else {
		req = pp_job_send(s->ev, s->ev, s->pp, empty_job, NULL);
	}
	if (req == NULL) {
		perror("job_send");
		exit(1);
	}
	tevent_req_set_callback(req, side_done, s);
	s->sent++;
}

static void side_done(struct tevent_req *req)
{
	struct side *s = tevent_req_callback_data_void(req);
	int ret;

	if (s->pool != NULL) {
		ret = evproxy_pool_job_recv(req);
	} else {
		ret = pp_job_recv(req);
	}
	talloc_free(req);
	if (ret != 0) {
		s->failed = true;
	}
	s->done++;
	if (s->sent < s->total) {
		side_submit(s);
	}
}

static void side_run(struct side *s, uint64_t total, unsigned window)
{
	s->sent = 0;
	s->done = 0;
	s->total = total;
	while (s->sent < total && s->sent < window) {
		side_submit(s);
	}
	while (s->done < total) {
		if (tevent_loop_once(s->ev) != 0) {
			perror("tevent_loop_once");
			exit(1);
		}
	}
	if (s->failed) {
		fprintf(stderr, "a benchmark job failed\n");
		exit(1);
	}
}

static void side_rtt(struct side *s, struct bench_result *r)
{
	uint64_t n = bench_count(200, 20000, 100000), i;
	uint64_t *samples = calloc(n, sizeof(*samples));

	if (samples == NULL) {
		perror("calloc");
		exit(1);
	}
	side_run(s, n / 10 + 1, 1);	/* warm up */
	for (i = 0; i < n; i++) {
		uint64_t t0 = bench_now_ns();

		side_run(s, 1, 1);
		samples[i] = bench_now_ns() - t0;
	}
	bench_percentiles(samples, n, r);
	free(samples);
	bench_add(r);
}

static void side_tput(struct side *s, struct bench_result *r)
{
	uint64_t n = bench_count(1000, 200000, 1000000);
	unsigned reps = bench_repeats(), i;
	double v[16];

	side_run(s, n / 10 + 1, JOBS_WINDOW);	/* warm up */
	for (i = 0; i < reps && i < 16; i++) {
		uint64_t t0 = bench_now_ns();

		side_run(s, n, JOBS_WINDOW);
		v[i] = (double)n * 1e9 / (double)(bench_now_ns() - t0);
	}
	r->value = bench_median(v, i);
	bench_add(r);
}

static struct evproxy_pool *pool_start(bool use_evpoll)
{
	struct evproxy_pool_config cfg;
	struct evproxy_pool *pool;

	evproxy_pool_config_default(&cfg);
	cfg.evpoll = use_evpoll;
	pool = evproxy_pool_create(NULL, 1, &cfg);
	if (pool == NULL) {
		perror("evproxy_pool_create");
		exit(1);
	}
	return pool;
}

void bench_pool(void)
{
	struct bench_result base_rtt = {
		.name = "pthreadpool_style_rtt", .unit = "ns",
		.goal = "baseline: mutex+condvar, threaded immediate",
	};
	struct bench_result pool_rtt = {
		.name = "pool_job_rtt", .unit = "ns",
		.baseline = "pthreadpool_style_rtt",
		.goal = "p50 at most the baseline's",
	};
	struct bench_result pool_rtt_evpoll = {
		.name = "pool_job_rtt_evpoll", .unit = "ns",
		.baseline = "pthreadpool_style_rtt",
		.goal = "spinning loops: well below the baseline",
	};
	struct bench_result base_tput = {
		.name = "pthreadpool_style_jobs_per_s", .unit = "jobs/s",
		.goal = "baseline",
	};
	struct bench_result pool_tput = {
		.name = "pool_jobs_per_s", .unit = "jobs/s",
		.baseline = "pthreadpool_style_jobs_per_s",
		.goal = "at least the baseline's rate",
	};
	struct side s = { 0 };

	/* baseline */
	s.ev = tevent_context_init_byname(NULL, "epoll");
	if (s.ev == NULL) {
		fprintf(stderr, "tevent_context_init_byname failed\n");
		exit(1);
	}
	s.pp = pp_create(s.ev);
	side_rtt(&s, &base_rtt);
	side_tput(&s, &base_tput);
	pp_destroy(s.pp);
	s.pp = NULL;

	/* the pool, same caller loop backend, sleeping worker */
	s.pool = pool_start(false);
	side_rtt(&s, &pool_rtt);
	side_tput(&s, &pool_tput);
	TALLOC_FREE(s.pool);
	talloc_free(s.ev);

	/* the pool, spinning loops on both sides */
	s.ev = evpoll_context_init(NULL, NULL);
	if (s.ev == NULL) {
		perror("evpoll_context_init");
		exit(1);
	}
	s.pool = pool_start(true);
	side_rtt(&s, &pool_rtt_evpoll);
	TALLOC_FREE(s.pool);
	talloc_free(s.ev);
}
