/*
 * Tests of the worker-thread pool (evproxy_pool.h).
 *
 * No timing assertions: every wait has a generous deadline that only turns
 * a hang into a failure. Orderings that matter are forced with gates (a
 * job that blocks until the test opens it).
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "evpoll.h"
#include "evproxy.h"
#include "evproxy_pool.h"
#include "testutil.h"

#define TIMEOUT_MS 60000

/* threads of the process between tests (main's, at start) */
static unsigned base_threads;

/* ---- helpers ------------------------------------------------------------ */

/* Threads of this process, from /proc/self/task. */
static unsigned thread_count(void)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	unsigned n = 0;

	assert_non_null(d);
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] != '.') {
			n++;
		}
	}
	closedir(d);
	return n;
}

/*
 * Wait until the process has n threads: a joined thread may still be
 * listed for a moment while the kernel finishes its exit.
 */
static void wait_threads(unsigned n)
{
	uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;
	unsigned have;

	while ((have = thread_count()) != n) {
		if (tu_now_ns() > deadline) {
			fail_msg("%u threads, expected %u", have, n);
		}
		usleep(1000);
	}
}

/* Spin (yielding) until *flag is set; fail after TIMEOUT_MS. */
static void wait_flag(atomic_bool *flag)
{
	uint64_t deadline = tu_now_ns() + TIMEOUT_MS * 1000000ULL;

	while (!atomic_load(flag)) {
		if (tu_now_ns() > deadline) {
			fail_msg("flag not set within %u ms", TIMEOUT_MS);
		}
		sched_yield();
	}
}

/* A gate that blocking jobs wait on. */
struct gate {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool open;
};

static void gate_init(struct gate *g)
{
	pthread_mutex_init(&g->lock, NULL);
	pthread_cond_init(&g->cond, NULL);
	g->open = false;
}

static void gate_open(struct gate *g)
{
	pthread_mutex_lock(&g->lock);
	g->open = true;
	pthread_cond_broadcast(&g->cond);
	pthread_mutex_unlock(&g->lock);
}

static void gate_destroy(struct gate *g)
{
	pthread_mutex_destroy(&g->lock);
	pthread_cond_destroy(&g->cond);
}

/* What a job records; fn_count counts the job's runs. */
struct job {
	atomic_uint runs;
	atomic_bool started, finished;
	pthread_t ran_on;
	struct gate *gate;	/* wait for it, if set */
	/* completion, on the caller's thread */
	bool done;
	int ret;
	unsigned *ndone;
	unsigned ndone_target;
	bool *all_done;
};

static void job_fn(void *private_data)
{
	struct job *j = private_data;

	j->ran_on = pthread_self();
	atomic_store(&j->started, true);
	atomic_fetch_add(&j->runs, 1);
	if (j->gate != NULL) {
		pthread_mutex_lock(&j->gate->lock);
		while (!j->gate->open) {
			pthread_cond_wait(&j->gate->cond, &j->gate->lock);
		}
		pthread_mutex_unlock(&j->gate->lock);
	}
	atomic_store(&j->finished, true);
}

static void job_done(struct tevent_req *req)
{
	struct job *j = tevent_req_callback_data_void(req);

	j->ret = evproxy_pool_job_recv(req);
	TALLOC_FREE(req);
	j->done = true;
	if (j->ndone != NULL) {
		(*j->ndone)++;
		if (*j->ndone == j->ndone_target && j->all_done != NULL) {
			*j->all_done = true;
		}
	}
}

static struct tevent_req *submit(TALLOC_CTX *mem_ctx,
				 struct tevent_context *ev,
				 struct evproxy_pool *pool, struct job *j)
{
	struct tevent_req *req;

	req = evproxy_pool_job_send(mem_ctx, ev, pool, job_fn, j);
	assert_non_null(req);
	tevent_req_set_callback(req, job_done, j);
	return req;
}

static struct evproxy_pool *pool_new(unsigned n, bool use_evpoll,
				     enum evpoll_mode mode)
{
	struct evproxy_pool_config cfg;
	struct evproxy_pool *pool;

	evproxy_pool_config_default(&cfg);
	cfg.evpoll = use_evpoll;
	cfg.evpoll_cfg.mode = mode;
	pool = evproxy_pool_create(NULL, n, &cfg);
	assert_non_null(pool);
	return pool;
}

/*
 * Submit n jobs from ev and run ev until all completed; each must have
 * run exactly once, on a worker, and completed with 0.
 */
static void run_batch(struct tevent_context *ev, struct evproxy_pool *pool,
		      unsigned n)
{
	struct job *jobs = calloc(n, sizeof(*jobs));
	unsigned ndone = 0, i;
	bool all = false;

	assert_non_null(jobs);
	for (i = 0; i < n; i++) {
		jobs[i].ndone = &ndone;
		jobs[i].ndone_target = n;
		jobs[i].all_done = &all;
		submit(ev, ev, pool, &jobs[i]);
	}
	tu_loop_until(ev, &all, TIMEOUT_MS);
	for (i = 0; i < n; i++) {
		assert_true(jobs[i].done);
		assert_int_equal(jobs[i].ret, 0);
		assert_int_equal(atomic_load(&jobs[i].runs), 1);
		assert_false(pthread_equal(jobs[i].ran_on, pthread_self()));
	}
	free(jobs);
}

/* ---- tests --------------------------------------------------------------- */

/* N jobs on K workers, epoll and evpoll workers, several caller backends */
static void test_many_jobs(void **state)
{
	static const struct {
		unsigned threads;
		bool evpoll;
		enum evpoll_mode mode;
		const char *caller;
	} cases[] = {
		{ 1, false, EVPOLL_MODE_AUTO, "epoll" },
		{ 3, false, EVPOLL_MODE_AUTO, "poll" },
		{ 2, true, EVPOLL_MODE_AUTO, "evpoll-auto" },
		{ 2, true, EVPOLL_MODE_ALWAYS, "epoll" },
		{ 4, true, EVPOLL_MODE_NEVER, "evpoll-always" },
	};
	unsigned c, before = base_threads;

	for (c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		struct tevent_context *ev = tu_context(NULL, cases[c].caller);
		struct evproxy_pool *pool = pool_new(cases[c].threads,
						     cases[c].evpoll,
						     cases[c].mode);

		wait_threads(before + cases[c].threads);
		run_batch(ev, pool, (unsigned)tu_scale(5000));
		run_batch(ev, pool, 1);
		talloc_free(pool);
		wait_threads(before);
		talloc_free(ev);
	}
}

/* Jobs from two caller loops on two threads, one pool. */
struct caller_arg {
	struct evproxy_pool *pool;
	const char *backend;
	unsigned n;
};

static void *caller_main(void *arg)
{
	struct caller_arg *a = arg;
	struct tevent_context *ev = tu_context(NULL, a->backend);

	run_batch(ev, a->pool, a->n);
	run_batch(ev, a->pool, a->n / 2 + 1);
	talloc_free(ev);	/* its endpoint goes with it */
	return NULL;
}

static void test_two_callers(void **state)
{
	struct evproxy_pool *pool = pool_new(2, false, EVPOLL_MODE_AUTO);
	struct caller_arg a = { pool, "epoll", (unsigned)tu_scale(5000) };
	struct caller_arg b = { pool, "evpoll-auto", (unsigned)tu_scale(5000) };
	pthread_t ta, tb;

	assert_int_equal(pthread_create(&ta, NULL, caller_main, &a), 0);
	assert_int_equal(pthread_create(&tb, NULL, caller_main, &b), 0);
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	talloc_free(pool);
}

/* A request freed while its job is queued: the job never runs. */
static void test_cancel_before_start(void **state)
{
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct evproxy_pool *pool = pool_new(1, false, EVPOLL_MODE_AUTO);
	struct gate g;
	struct job a = { .gate = &g }, b = { 0 }, c = { 0 };
	struct tevent_req *req_b;

	gate_init(&g);
	submit(ev, ev, pool, &a);
	wait_flag(&a.started);		/* the only worker is busy with a */
	req_b = submit(ev, ev, pool, &b);
	submit(ev, ev, pool, &c);	/* queued behind b */
	TALLOC_FREE(req_b);
	gate_open(&g);
	tu_loop_until(ev, &a.done, TIMEOUT_MS);
	tu_loop_until(ev, &c.done, TIMEOUT_MS);
	/* FIFO: had b been left queued, it would have run before c */
	assert_int_equal(a.ret, 0);
	assert_int_equal(c.ret, 0);
	assert_int_equal(atomic_load(&c.runs), 1);
	assert_int_equal(atomic_load(&b.runs), 0);
	assert_false(b.done);
	talloc_free(pool);
	assert_int_equal(atomic_load(&b.runs), 0);
	talloc_free(ev);
	gate_destroy(&g);
}

/* A request freed while its job runs: fn finishes, nothing else happens. */
static void test_cancel_after_start(void **state)
{
	struct tevent_context *ev = tu_context(NULL, "evpoll-auto");
	struct evproxy_pool *pool = pool_new(1, true, EVPOLL_MODE_AUTO);
	struct gate g;
	struct job *a = talloc_zero(NULL, struct job);
	struct job after = { 0 };
	struct tevent_req *req_a;

	gate_init(&g);
	a->gate = &g;
	req_a = submit(ev, ev, pool, a);
	wait_flag(&a->started);
	TALLOC_FREE(req_a);		/* while fn runs */
	gate_open(&g);
	wait_flag(&a->finished);
	/* the completion of a reaches ev before that of a later job */
	submit(ev, ev, pool, &after);
	tu_loop_until(ev, &after.done, TIMEOUT_MS);
	assert_int_equal(after.ret, 0);
	assert_int_equal(atomic_load(&a->runs), 1);
	assert_false(a->done);		/* no callback for a freed request */
	talloc_free(pool);
	talloc_free(ev);
	talloc_free(a);
	gate_destroy(&g);
}

/*
 * The caller's loop is freed with jobs in flight: the running job
 * finishes, queued ones never run, requests that outlive the loop stay
 * pending, requests freed with it are gone; nothing leaks.
 */
static void test_free_ev_in_flight(void **state)
{
	struct tevent_context *main_ev = tu_context(NULL, "epoll");
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct evproxy_pool *pool = pool_new(1, false, EVPOLL_MODE_AUTO);
	struct gate g;
	struct job a = { 0 }, q[6] = { { 0 } }, after = { 0 };
	struct tevent_req *outliving[3];
	unsigned i;

	gate_init(&g);
	a.gate = &g;
	submit(ev, ev, pool, &a);
	wait_flag(&a.started);
	for (i = 0; i < 6; i++) {
		if (i < 3) {
			/* parent NULL: these requests outlive ev */
			outliving[i] = submit(NULL, ev, pool, &q[i]);
		} else {
			submit(ev, ev, pool, &q[i]);
		}
	}
	talloc_free(ev);
	gate_open(&g);
	wait_flag(&a.finished);
	/* the worker is free again and serves another loop */
	submit(main_ev, main_ev, pool, &after);
	tu_loop_until(main_ev, &after.done, TIMEOUT_MS);
	assert_int_equal(after.ret, 0);
	talloc_free(pool);
	assert_int_equal(atomic_load(&a.runs), 1);
	assert_false(a.done);
	for (i = 0; i < 6; i++) {
		assert_int_equal(atomic_load(&q[i].runs), 0);
		assert_false(q[i].done);
	}
	for (i = 0; i < 3; i++) {
		assert_true(tevent_req_is_in_progress(outliving[i]));
		talloc_free(outliving[i]);
	}
	talloc_free(main_ev);
	gate_destroy(&g);
}

/*
 * Freeing the pool with jobs queued: they complete with ECANCELED without
 * running, the running job completes normally, every worker is joined.
 * The pool is freed on a helper thread while a job blocks the only worker,
 * so the ECANCELED completions must arrive before the gate opens.
 */
static void *free_pool_main(void *arg)
{
	talloc_free(arg);
	return NULL;
}

static void test_shutdown_queued(void **state)
{
	unsigned before = base_threads;
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct evproxy_pool *pool = pool_new(1, false, EVPOLL_MODE_AUTO);
	struct gate g;
	struct job a = { 0 }, q[5] = { { 0 } };
	unsigned ndone = 0, i;
	bool all = false;
	pthread_t t;

	wait_threads(before + 1);
	gate_init(&g);
	a.gate = &g;
	submit(ev, ev, pool, &a);
	wait_flag(&a.started);
	for (i = 0; i < 5; i++) {
		q[i].ndone = &ndone;
		q[i].ndone_target = 5;
		q[i].all_done = &all;
		submit(ev, ev, pool, &q[i]);
	}
	assert_int_equal(pthread_create(&t, NULL, free_pool_main, pool), 0);
	tu_loop_until(ev, &all, TIMEOUT_MS);
	for (i = 0; i < 5; i++) {
		assert_int_equal(q[i].ret, ECANCELED);
		assert_int_equal(atomic_load(&q[i].runs), 0);
	}
	assert_false(a.done);
	gate_open(&g);
	pthread_join(t, NULL);		/* returns once the worker is joined */
	wait_threads(before);
	tu_loop_until(ev, &a.done, TIMEOUT_MS);
	assert_int_equal(a.ret, 0);
	assert_int_equal(atomic_load(&a.runs), 1);
	talloc_free(ev);
	gate_destroy(&g);
}

/*
 * A completion callback frees the pool: the loop's endpoint then goes
 * away by itself, so tevent_loop_wait() returns and the loop holds no
 * memory of the pool.
 */
struct wait_state {
	struct evproxy_pool *pool;
	unsigned n, done;
	int bad;
};

static void wait_job(void *private_data)
{
}

static void wait_done(struct tevent_req *req)
{
	struct wait_state *s = tevent_req_callback_data_void(req);

	if (evproxy_pool_job_recv(req) != 0) {
		s->bad++;
	}
	talloc_free(req);
	if (++s->done == s->n) {
		TALLOC_FREE(s->pool);
	}
}

static void test_loop_wait_returns(void **state)
{
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct wait_state s = { .n = 50 };
	size_t blocks = talloc_total_blocks(ev);
	unsigned before = base_threads, i;

	s.pool = pool_new(2, false, EVPOLL_MODE_AUTO);
	for (i = 0; i < s.n; i++) {
		struct tevent_req *req = evproxy_pool_job_send(
			ev, ev, s.pool, wait_job, NULL);

		assert_non_null(req);
		tevent_req_set_callback(req, wait_done, &s);
	}
	alarm(120);	/* a loop that never ends fails instead of hanging */
	assert_int_equal(tevent_loop_wait(ev), 0);
	alarm(0);
	assert_null(s.pool);
	assert_int_equal(s.done, s.n);
	assert_int_equal(s.bad, 0);
	assert_int_equal(talloc_total_blocks(ev), blocks);
	wait_threads(before);
	talloc_free(ev);
}

/* A pool that is freed right away, with or without ever being used. */
static void test_create_free(void **state)
{
	unsigned before = base_threads, i;

	for (i = 0; i < 20; i++) {
		struct evproxy_pool *pool = pool_new(1 + i % 4, i % 2 == 1,
						     EVPOLL_MODE_AUTO);

		talloc_free(pool);
	}
	wait_threads(before);
}

static void test_args(void **state)
{
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct evproxy_pool_config cfg;
	struct evproxy_pool *pool;
	struct tevent_req *req;
	unsigned before = base_threads;

	errno = 0;
	assert_null(evproxy_pool_create(NULL, 0, NULL));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evproxy_pool_create(NULL, 100000, NULL));
	assert_int_equal(errno, EINVAL);
	/* an invalid evpoll configuration: no thread is left behind */
	evproxy_pool_config_default(&cfg);
	cfg.evpoll = true;
	cfg.evpoll_cfg.poll_iterations = 0;
	errno = 0;
	assert_null(evproxy_pool_create(NULL, 2, &cfg));
	assert_int_equal(errno, EINVAL);
	wait_threads(before);
	evproxy_pool_config_default(NULL);

	pool = evproxy_pool_create(NULL, 1, NULL);
	assert_non_null(pool);

	errno = 0;
	assert_null(evproxy_pool_job_send(NULL, NULL, pool, wait_job, NULL));
	assert_int_equal(errno, EINVAL);

	req = evproxy_pool_job_send(NULL, ev, NULL, wait_job, NULL);
	assert_non_null(req);
	assert_true(tevent_req_poll(req, ev));
	assert_int_equal(evproxy_pool_job_recv(req), EINVAL);
	talloc_free(req);

	req = evproxy_pool_job_send(NULL, ev, pool, NULL, NULL);
	assert_non_null(req);
	assert_true(tevent_req_poll(req, ev));
	assert_int_equal(evproxy_pool_job_recv(req), EINVAL);
	talloc_free(req);

	/* tevent_req_poll() works as with any request */
	req = evproxy_pool_job_send(NULL, ev, pool, wait_job, NULL);
	assert_non_null(req);
	assert_true(tevent_req_poll(req, ev));
	assert_int_equal(evproxy_pool_job_recv(req), 0);
	talloc_free(req);

	assert_int_equal(evproxy_pool_job_recv(NULL), EINVAL);
	talloc_free(pool);
	talloc_free(ev);
}

static void *nop_main(void *arg)
{
	return NULL;
}

int main(void)
{
	pthread_t t;
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_args),
		cmocka_unit_test(test_create_free),
		cmocka_unit_test(test_many_jobs),
		cmocka_unit_test(test_two_callers),
		cmocka_unit_test(test_cancel_before_start),
		cmocka_unit_test(test_cancel_after_start),
		cmocka_unit_test(test_free_ev_in_flight),
		cmocka_unit_test(test_shutdown_queued),
		cmocka_unit_test(test_loop_wait_returns),
	};

	/* messages cross threads: no global talloc parent */
	talloc_disable_null_tracking();
	/*
	 * The baseline thread count, after a first thread was started and
	 * joined: a sanitizer may add a helper thread of its own then.
	 */
	if (pthread_create(&t, NULL, nop_main, NULL) != 0 ||
	    pthread_join(t, NULL) != 0) {
		return 1;
	}
	usleep(10000);
	base_threads = thread_count();
	return cmocka_run_group_tests(tests, NULL, NULL);
}
