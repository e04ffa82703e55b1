/*
 * Tests of the evproxy doorbells (include/evproxy.h).
 *
 * - delivery and coalescing on every backend, also of rings made from
 *   inside the handler;
 * - exact coalescing under concurrency: the rings the handler is told
 *   about add up to the rings made, on a sleeping and a spinning loop;
 * - the syscall protocol, proved with the statistics: only the ring that
 *   makes the doorbell pending writes the eventfd, and none does while an
 *   evpoll loop spins;
 * - a ring counts as activity on an evpoll AUTO loop;
 * - use cases: shutdown of loop threads, a work queue, rings from a signal
 *   handler and from threads without a loop, a foreign loop waiting on
 *   evproxy_doorbell_fd();
 * - lifetime: ringers outliving the doorbell and its loop, reference
 *   counting, freeing from inside the handler (also from a nested loop),
 *   freeing while other threads ring;
 * - errors (EINVAL, EMFILE, ENOMEM without leaks) and fork().
 *
 * Hangs (a lost wake-up blocks the loop for ever) are caught by a watchdog
 * alarm per test. No assertion depends on timing.
 */

/* tevent_loop_allow_nesting() for the nested-loop test */
#define TEVENT_DEPRECATED 1

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "evpoll.h"
#include "evproxy.h"
#include "testutil.h"

/* generous: valgrind and the sanitizers are slow, the machine is noisy */
#define LOOP_TIMEOUT_MS 120000
#define WAIT_TIMEOUT_MS 60000
#define WATCHDOG_SECONDS 600

/* the backend the current check runs on, for failure messages */
static const char *cur_spec = "-";

#define CHECK_U64(a, b) \
	check_u64((uint64_t)(a), (uint64_t)(b), #a, #b, __FILE__, __LINE__)

static void check_u64(uint64_t a, uint64_t b, const char *sa, const char *sb,
		      const char *file, int line)
{
	if (a != b) {
		fail_msg("%s:%d [%s]: %s == %" PRIu64 ", expected %s == %"
			 PRIu64, file, line, cur_spec, sa, a, sb, b);
	}
}

#define CHECK_TRUE(c) check_true((c), #c, __FILE__, __LINE__)

static void check_true(bool c, const char *what, const char *file, int line)
{
	if (!c) {
		fail_msg("%s:%d [%s]: %s is false", file, line, cur_spec,
			 what);
	}
}

/* ---------------------------------------------------------------------
 * Shared helpers
 */

static void watchdog_fired(int sig)
{
	static const char msg[] =
		"test_doorbell: watchdog: a test hung (lost wake-up?)\n";
	ssize_t n = write(STDERR_FILENO, msg, sizeof(msg) - 1);

	(void)n;
	_exit(97);
}

static int setup_watchdog(void **state)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = watchdog_fired;
	sigaction(SIGALRM, &sa, NULL);
	alarm(WATCHDOG_SECONDS);
	cur_spec = "-";
	return 0;
}

static int teardown_watchdog(void **state)
{
	alarm(0);
	return 0;
}

/* What a doorbell handler saw. Owner thread, except "published". */
struct tally {
	uint64_t calls;
	uint64_t rings;
	uint64_t max_rings;
	uint64_t zero_calls;	/* calls with rings == 0: must stay 0 */
	uint64_t target;	/* done once rings >= target */
	bool done;
	/* if non-NULL: free *free_db once rings >= free_at */
	struct evproxy_doorbell **free_db;
	uint64_t free_at;
	/* rings, for other threads */
	atomic_uint_fast64_t published;
};

static void tally_handler(struct tevent_context *ev,
			  struct evproxy_doorbell *db, uint64_t rings,
			  void *private_data)
{
	struct tally *t = private_data;

	t->calls++;
	t->rings += rings;
	if (rings == 0) {
		t->zero_calls++;
	}
	if (rings > t->max_rings) {
		t->max_rings = rings;
	}
	atomic_store_explicit(&t->published, t->rings, memory_order_release);
	if (t->rings >= t->target) {
		t->done = true;
	}
	if (t->free_db != NULL && *t->free_db == db &&
	    t->rings >= t->free_at) {
		talloc_free(db);
		*t->free_db = NULL;
		t->done = true;
	}
}

static struct evproxy_doorbell_stats get_stats(struct evproxy_doorbell *db)
{
	struct evproxy_doorbell_stats st;

	memset(&st, 0xff, sizeof(st));
	assert_int_equal(evproxy_doorbell_get_stats(db, &st), 0);
	return st;
}

static void timer_fired(struct tevent_context *ev, struct tevent_timer *te,
			struct timeval now, void *private_data)
{
	bool *fired = private_data;

	*fired = true;
}

/* Run the loop for about @p ms (a timer ends it). */
static void run_for(struct tevent_context *ev, unsigned ms)
{
	bool fired = false;
	struct tevent_timer *te;

	te = tevent_add_timer(ev, ev, tevent_timeval_current_ofs(0, ms * 1000),
			      timer_fired, &fired);
	assert_non_null(te);
	tu_loop_until(ev, &fired, LOOP_TIMEOUT_MS);
}

/* Run the loop until it spins (evpoll ALWAYS, or AUTO pinned). */
static void loop_until_spinning(struct tevent_context *ev)
{
	unsigned i;

	for (i = 0; i < 1000 && !evpoll_is_spinning(ev); i++) {
		assert_int_equal(tevent_loop_once(ev), 0);
	}
	CHECK_TRUE(evpoll_is_spinning(ev));
}

/* Wait (another thread than the owner) until *v >= want. */
static bool wait_ge(atomic_uint_fast64_t *v, uint64_t want,
		    unsigned timeout_ms)
{
	uint64_t deadline = tu_now_ns() + (uint64_t)timeout_ms * 1000000ULL;

	while (atomic_load_explicit(v, memory_order_acquire) < want) {
		if (tu_now_ns() > deadline) {
			return false;
		}
		sched_yield();
	}
	return true;
}

static bool fd_readable(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int n;

	do {
		n = poll(&p, 1, 0);
	} while (n == -1 && errno == EINTR);
	assert_int_not_equal(n, -1);
	return n == 1 && (p.revents & POLLIN) != 0;
}

/* The lowest free fd number (what the next open() would return). */
static int lowest_free_fd(void)
{
	int fd = dup(0);

	assert_int_not_equal(fd, -1);
	close(fd);
	return fd;
}

/* ---------------------------------------------------------------------
 * 1. Every backend
 */

static void test_every_backend(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_doorbell_stats st;
		struct tally t = { .target = 5 };
		struct tu_debug_log log;
		unsigned i;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		tu_capture_debug(ev, &log);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);

		for (i = 0; i < 5; i++) {
			assert_int_equal(evproxy_ring_doorbell(db), 0);
		}
		st = get_stats(db);
		CHECK_U64(st.rings, 5);
		CHECK_U64(st.pending, 5);
		CHECK_U64(st.handler_calls, 0);
		/* the loop never ran, so it may sleep: one write */
		CHECK_U64(st.kernel_wakeups, 1);
		CHECK_U64(st.wakeups_avoided, 4);
		CHECK_U64(t.calls, 0);

		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_U64(t.calls, 1);
		CHECK_U64(t.rings, 5);

		/* no second call for the same rings */
		run_for(ev, 20);
		CHECK_U64(t.calls, 1);
		st = get_stats(db);
		CHECK_U64(st.rings, 5);
		CHECK_U64(st.pending, 0);
		CHECK_U64(st.handler_calls, 1);

		/* and it works again */
		t.done = false;
		t.target = 8;
		for (i = 0; i < 3; i++) {
			assert_int_equal(evproxy_ring_doorbell(db), 0);
		}
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_U64(t.calls, 2);
		CHECK_U64(t.rings, 8);
		CHECK_U64(t.zero_calls, 0);
		st = get_stats(db);
		CHECK_U64(st.rings, 8);
		CHECK_U64(st.pending, 0);
		CHECK_U64(st.handler_calls, 2);
		CHECK_U64(st.ring_wakeups + st.wakeups_avoided, 8);

		/* removing the doorbell leaves tevent nothing to complain */
		talloc_free(db);
		run_for(ev, 5);
		if (log.count != 0) {
			fail_msg("[%s] tevent reported: %s", *spec, log.text);
		}
		talloc_free(mem);
	}
}

/* A handler that rings its own doorbell again: each ring is a new call. */
struct rering {
	uint64_t calls;
	uint64_t rings;
	uint64_t max;
	bool done;
};

static void rering_handler(struct tevent_context *ev,
			   struct evproxy_doorbell *db, uint64_t rings,
			   void *private_data)
{
	struct rering *rr = private_data;

	rr->calls++;
	rr->rings += rings;
	if (rr->calls < rr->max) {
		assert_int_equal(evproxy_ring_doorbell(db), 0);
	} else {
		rr->done = true;
	}
}

static void test_ring_from_handler(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_doorbell_stats st;
		struct rering rr = { .max = 10 };

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		db = evproxy_add_doorbell(ev, mem, rering_handler, &rr);
		assert_non_null(db);
		assert_int_equal(evproxy_ring_doorbell(db), 0);
		tu_loop_until(ev, &rr.done, LOOP_TIMEOUT_MS);
		run_for(ev, 5);
		CHECK_U64(rr.calls, 10);
		CHECK_U64(rr.rings, 10);
		st = get_stats(db);
		CHECK_U64(st.rings, 10);
		CHECK_U64(st.handler_calls, 10);
		CHECK_U64(st.pending, 0);
		talloc_free(mem);
	}
}

/* Two doorbells on one loop do not mix. */
static void test_two_doorbells(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *a, *b;
		struct tally ta = { .target = 2 };
		struct tally tb = { .target = 1 };

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		a = evproxy_add_doorbell(ev, mem, tally_handler, &ta);
		b = evproxy_add_doorbell(ev, mem, tally_handler, &tb);
		assert_non_null(a);
		assert_non_null(b);
		assert_int_equal(evproxy_ring_doorbell(a), 0);
		assert_int_equal(evproxy_ring_doorbell(a), 0);
		tu_loop_until(ev, &ta.done, LOOP_TIMEOUT_MS);
		run_for(ev, 5);
		CHECK_U64(ta.rings, 2);
		CHECK_U64(tb.calls, 0);
		assert_int_equal(evproxy_ring_doorbell(b), 0);
		tu_loop_until(ev, &tb.done, LOOP_TIMEOUT_MS);
		run_for(ev, 5);
		CHECK_U64(ta.calls, 1);
		CHECK_U64(tb.calls, 1);
		CHECK_U64(tb.rings, 1);
		talloc_free(mem);
	}
}

/* ---------------------------------------------------------------------
 * 2. Exact coalescing under concurrency
 */

struct ringer_thread {
	pthread_t tid;
	struct evproxy_ringer *r;
	struct evproxy_doorbell *db;	/* if non-NULL, ring it directly */
	/*
	 * If non-NULL: at each tenth of its rings, a thread waits until the
	 * loop delivered that many rings of each of the @p threads, so at
	 * least ten handler calls overlap the ringing however the threads
	 * are scheduled (a call that completes a tenth comes before any ring
	 * of the next tenth).
	 */
	atomic_uint_fast64_t *pace;
	unsigned threads;
	uint64_t count;
	uint64_t ok;
	uint64_t other;			/* any result but 0 */
	bool timed_out;
};

static void *ringer_main(void *arg)
{
	struct ringer_thread *rt = arg;
	uint64_t step = rt->count / 10;
	uint64_t i;

	for (i = 0; i < rt->count; i++) {
		int ret;

		if (rt->pace != NULL && step > 0 && i > 0 && i % step == 0 &&
		    !wait_ge(rt->pace, i * rt->threads, WAIT_TIMEOUT_MS)) {
			rt->timed_out = true;
		}

		if (rt->db != NULL) {
			ret = evproxy_ring_doorbell(rt->db);
		} else {
			ret = evproxy_ringer_ring(rt->r);
		}
		if (ret == 0) {
			rt->ok++;
		} else {
			rt->other++;
		}
	}
	return NULL;
}

#define CONC_THREADS 4

static void run_concurrent(const char *spec)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev;
	struct evproxy_doorbell *db;
	struct evproxy_doorbell_stats st;
	struct ringer_thread rt[CONC_THREADS];
	uint64_t n = tu_scale(100000);
	uint64_t total = n * CONC_THREADS;
	struct tally t = { .target = total };
	unsigned i;

	cur_spec = spec;
	ev = tu_context(mem, spec);
	db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
	assert_non_null(db);
	if (strcmp(spec, "evpoll-always") == 0) {
		/* every ring below then finds the loop spinning */
		loop_until_spinning(ev);
	}

	memset(rt, 0, sizeof(rt));
	for (i = 0; i < CONC_THREADS; i++) {
		rt[i].r = evproxy_doorbell_ringer(db);
		assert_non_null(rt[i].r);
		/* half ring the doorbell itself: it lives until the join */
		rt[i].db = (i % 2 == 1) ? db : NULL;
		rt[i].count = n;
		rt[i].pace = &t.published;
		rt[i].threads = CONC_THREADS;
		assert_int_equal(pthread_create(&rt[i].tid, NULL, ringer_main,
						&rt[i]), 0);
	}
	tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
	for (i = 0; i < CONC_THREADS; i++) {
		assert_int_equal(pthread_join(rt[i].tid, NULL), 0);
		CHECK_U64(rt[i].ok, n);
		CHECK_U64(rt[i].other, 0);
		CHECK_TRUE(!rt[i].timed_out);
		evproxy_ringer_unref(rt[i].r);
	}
	run_for(ev, 5);

	CHECK_U64(t.rings, total);
	CHECK_U64(t.zero_calls, 0);
	/* pacing: the loop delivered while the threads still rang */
	CHECK_TRUE(t.calls >= 10);
	CHECK_TRUE(t.calls <= total);
	st = get_stats(db);
	CHECK_U64(st.rings, total);
	CHECK_U64(st.pending, 0);
	CHECK_U64(st.handler_calls, t.calls);
	/* every ring wrote the eventfd or avoided it, exactly */
	CHECK_U64(st.ring_wakeups + st.wakeups_avoided, total);
	CHECK_TRUE(st.kernel_wakeups >= st.ring_wakeups);
	if (strcmp(spec, "epoll") == 0) {
		/*
		 * Each call covers the rings since the doorbell last became
		 * pending, and every such ring writes on a sleeping loop.
		 */
		CHECK_U64(st.kernel_wakeups, st.handler_calls);
	} else if (strcmp(spec, "evpoll-always") == 0) {
		/* the loop spun all the time */
		CHECK_U64(st.kernel_wakeups, 0);
	} else {
		struct evpoll_stats es;

		/*
		 * A ring that made the doorbell pending, or an exit
		 * callback that found it pending, wrote.
		 */
		assert_int_equal(evpoll_get_stats(ev, &es), 0);
		CHECK_TRUE(st.kernel_wakeups <=
			   st.handler_calls + es.spin_exits);
	}
	print_message("[%s] %" PRIu64 " rings in %" PRIu64
		      " handler calls, %" PRIu64 " kernel wake-ups\n",
		      spec, total, t.calls, st.kernel_wakeups);
	talloc_free(mem);
}

static void test_concurrent_coalescing(void **state)
{
	run_concurrent("epoll");
	run_concurrent("evpoll-always");
	run_concurrent("evpoll-auto");
}

/* ---------------------------------------------------------------------
 * 3. The syscall protocol, proved with the statistics
 */

/* (a) rings of an already pending doorbell make no syscall */
static void test_pending_rings_no_syscall(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_doorbell_stats st;
		struct ringer_thread rt;
		struct tally t = { .target = 2000 };
		unsigned i;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		for (i = 0; i < 1000; i++) {
			assert_int_equal(evproxy_ring_doorbell(db), 0);
		}
		st = get_stats(db);
		CHECK_U64(st.kernel_wakeups, 1);
		CHECK_U64(st.wakeups_avoided, 999);
		CHECK_U64(st.pending, 1000);
		CHECK_U64(st.rings, 1000);
		CHECK_U64(st.handler_calls, 0);

		/* the same from a thread while the loop does not run */
		memset(&rt, 0, sizeof(rt));
		rt.r = evproxy_doorbell_ringer(db);
		rt.count = 1000;
		assert_int_equal(pthread_create(&rt.tid, NULL, ringer_main,
						&rt), 0);
		assert_int_equal(pthread_join(rt.tid, NULL), 0);
		CHECK_U64(rt.ok, 1000);
		evproxy_ringer_unref(rt.r);
		st = get_stats(db);
		CHECK_U64(st.kernel_wakeups, 1);
		CHECK_U64(st.pending, 2000);

		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_U64(t.calls, 1);
		CHECK_U64(t.rings, 2000);
		st = get_stats(db);
		CHECK_U64(st.pending, 0);
		CHECK_U64(st.kernel_wakeups, 1);
		talloc_free(mem);
	}
}

/* A thread that rings, then waits for the delivery, @p rounds times. */
struct pinger {
	pthread_t tid;
	struct evproxy_ringer *r;
	atomic_uint_fast64_t *delivered;
	uint64_t rounds;
	uint64_t done;
	int error;		/* first ring error */
	bool timed_out;
};

static void *pinger_main(void *arg)
{
	struct pinger *p = arg;
	uint64_t i;

	for (i = 0; i < p->rounds; i++) {
		int ret = evproxy_ringer_ring(p->r);

		if (ret != 0) {
			p->error = ret;
			break;
		}
		if (!wait_ge(p->delivered, i + 1, WAIT_TIMEOUT_MS)) {
			p->timed_out = true;
			break;
		}
		p->done++;
	}
	return NULL;
}

/*
 * Ping @p rounds rings from another thread, each delivered before the
 * next. Returns the doorbell's statistics.
 */
static struct evproxy_doorbell_stats ping(struct tevent_context *ev,
					  uint64_t rounds)
{
	struct evproxy_doorbell *db;
	struct evproxy_doorbell_stats st;
	struct tally t = { .target = rounds };
	struct pinger p;

	db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
	assert_non_null(db);
	memset(&p, 0, sizeof(p));
	p.r = evproxy_doorbell_ringer(db);
	assert_non_null(p.r);
	p.delivered = &t.published;
	p.rounds = rounds;
	assert_int_equal(pthread_create(&p.tid, NULL, pinger_main, &p), 0);
	tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
	assert_int_equal(pthread_join(p.tid, NULL), 0);
	assert_int_equal(p.error, 0);
	CHECK_TRUE(!p.timed_out);
	CHECK_U64(p.done, rounds);
	CHECK_U64(t.calls, rounds);
	CHECK_U64(t.rings, rounds);
	st = get_stats(db);
	CHECK_U64(st.rings, rounds);
	CHECK_U64(st.handler_calls, rounds);
	CHECK_U64(st.pending, 0);
	evproxy_ringer_unref(p.r);
	talloc_free(db);
	return st;
}

/* (b) a spinning evpoll loop takes rings without any syscall */
static void test_spinning_no_syscall(void **state)
{
	uint64_t rounds = tu_scale(1000);
	struct evproxy_doorbell_stats st;
	struct evpoll_config cfg;
	struct tevent_context *ev;
	TALLOC_CTX *mem = talloc_new(NULL);

	/* ALWAYS never stores "may sleep": exactly no write */
	cur_spec = "evpoll-always";
	ev = tu_context(mem, "evpoll-always");
	loop_until_spinning(ev);
	st = ping(ev, rounds);
	CHECK_U64(st.kernel_wakeups, 0);
	CHECK_U64(st.wakeups_avoided, rounds);
	CHECK_TRUE(evpoll_is_spinning(ev));

	/* AUTO pinned never stops spinning either, whatever spin_ns */
	cur_spec = "evpoll-auto pinned";
	ev = tu_context(mem, "evpoll-auto");
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	cfg.spin_ns = 1000;
	assert_int_equal(evpoll_set_config(ev, &cfg), 0);
	evpoll_pin(ev);
	loop_until_spinning(ev);
	st = ping(ev, rounds);
	CHECK_U64(st.kernel_wakeups, 0);
	CHECK_U64(st.wakeups_avoided, rounds);
	CHECK_TRUE(evpoll_is_spinning(ev));
	evpoll_unpin(ev);

	talloc_free(mem);
}

/* (c) on a sleeping loop every ring that found the doorbell idle writes */
static void test_sleeping_one_syscall(void **state)
{
	static const char *const specs[] = {
		"epoll", "poll", "poll_mt", "standard", "evpoll-never", NULL,
	};
	uint64_t rounds = tu_scale(1000);
	const char *const *spec;

	for (spec = specs; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell_stats st;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		st = ping(ev, rounds);
		CHECK_U64(st.kernel_wakeups, rounds);
		CHECK_U64(st.wakeups_avoided, 0);
		CHECK_TRUE(!evpoll_is_spinning(ev));
		talloc_free(mem);
	}
}

/* ---------------------------------------------------------------------
 * 4. A ring is activity on an evpoll AUTO loop
 */

static void *ring_once_main(void *arg)
{
	struct evproxy_ringer *r = arg;

	return (void *)(intptr_t)evproxy_ringer_ring(r);
}

static void test_ring_is_activity(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev;
	struct evproxy_doorbell *db;
	struct evproxy_ringer *r;
	struct evpoll_config cfg;
	struct evpoll_stats es;
	struct tally t = { .target = 1 };
	uint64_t entries;
	unsigned round, i;

	cur_spec = "evpoll-auto";
	ev = tu_context(mem, "evpoll-auto");
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	cfg.spin_ns = 1000000;	/* 1 ms */
	assert_int_equal(evpoll_set_config(ev, &cfg), 0);
	db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
	assert_non_null(db);
	r = evproxy_doorbell_ringer(db);
	assert_non_null(r);
	CHECK_TRUE(!evpoll_is_spinning(ev));

	for (round = 0; round < 5; round++) {
		pthread_t tid;
		void *ret;

		/* let the spin run out */
		for (i = 0; i < 1000000 && evpoll_is_spinning(ev); i++) {
			assert_int_equal(tevent_loop_once(ev), 0);
		}
		CHECK_TRUE(!evpoll_is_spinning(ev));
		assert_int_equal(evpoll_get_stats(ev, &es), 0);
		entries = es.spin_entries;

		t.done = false;
		t.target = round + 1;
		assert_int_equal(pthread_create(&tid, NULL, ring_once_main, r),
				 0);
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		assert_int_equal(pthread_join(tid, &ret), 0);
		assert_int_equal((intptr_t)ret, 0);

		/* the loop that ran the handler is spinning again */
		CHECK_TRUE(evpoll_is_spinning(ev));
		assert_int_equal(evpoll_get_stats(ev, &es), 0);
		CHECK_U64(es.spin_entries, entries + 1);
	}
	CHECK_U64(t.calls, 5);

	/* NEVER mode: delivered, but no spin */
	talloc_free(db);
	evproxy_ringer_unref(r);
	cur_spec = "evpoll-never";
	ev = tu_context(mem, "evpoll-never");
	memset(&t, 0, sizeof(t));
	t.target = 1;
	db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
	assert_non_null(db);
	assert_int_equal(evproxy_ring_doorbell(db), 0);
	tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
	CHECK_TRUE(!evpoll_is_spinning(ev));
	assert_int_equal(evpoll_get_stats(ev, &es), 0);
	CHECK_U64(es.spin_entries, 0);
	talloc_free(mem);
}

/* ---------------------------------------------------------------------
 * 5. Use cases
 */

/* Shutdown: one loop thread per backend, a "stop" doorbell each. */
struct loop_thread {
	pthread_t tid;
	const char *spec;
	bool use_loop_wait;	/* tevent_loop_wait(), the handler frees */
	pthread_mutex_t *lock;
	pthread_cond_t *cond;
	unsigned *ready;
	struct evproxy_ringer *r;	/* published under *lock */
	struct evproxy_doorbell *db;
	bool stop;
	uint64_t rings;
	const char *error;
};

static void stop_handler(struct tevent_context *ev,
			 struct evproxy_doorbell *db, uint64_t rings,
			 void *private_data)
{
	struct loop_thread *lt = private_data;

	lt->rings += rings;
	lt->stop = true;
	if (lt->use_loop_wait) {
		/* the last event: tevent_loop_wait() returns */
		talloc_free(db);
		lt->db = NULL;
	}
}

static void *loop_thread_main(void *arg)
{
	struct loop_thread *lt = arg;
	struct tevent_context *ev;
	TALLOC_CTX *mem = talloc_new(NULL);
	struct evproxy_ringer *r = NULL;

	ev = tu_context_try(mem, lt->spec);
	if (ev == NULL) {
		lt->error = "no context";
	} else {
		lt->db = evproxy_add_doorbell(ev, ev, stop_handler, lt);
		if (lt->db == NULL) {
			lt->error = "no doorbell";
		} else {
			r = evproxy_doorbell_ringer(lt->db);
		}
	}
	pthread_mutex_lock(lt->lock);
	lt->r = r;
	(*lt->ready)++;
	pthread_cond_signal(lt->cond);
	pthread_mutex_unlock(lt->lock);
	if (r == NULL) {
		talloc_free(mem);
		return NULL;
	}

	if (lt->use_loop_wait) {
		if (tevent_loop_wait(ev) != 0) {
			lt->error = "tevent_loop_wait failed";
		}
	} else {
		while (!lt->stop) {
			if (tevent_loop_once(ev) != 0) {
				lt->error = "tevent_loop_once failed";
				break;
			}
		}
	}
	if (!lt->stop && lt->error == NULL) {
		lt->error = "loop ended without the stop ring";
	}
	talloc_free(mem);
	return NULL;
}

static void test_shutdown_threads(void **state)
{
	pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
	struct loop_thread lt[16];
	unsigned n = 0, ready = 0, i, k;

	/* tevent's one-time backend set-up, before threads race for it */
	assert_true(evpoll_init());

	memset(lt, 0, sizeof(lt));
	for (k = 0; k < 2; k++) {
		const char *const *spec;

		for (spec = tu_all_backends; *spec != NULL; spec++) {
			lt[n].spec = *spec;
			lt[n].use_loop_wait = (k == 1);
			lt[n].lock = &lock;
			lt[n].cond = &cond;
			lt[n].ready = &ready;
			n++;
		}
	}
	for (i = 0; i < n; i++) {
		assert_int_equal(pthread_create(&lt[i].tid, NULL,
						loop_thread_main, &lt[i]), 0);
	}
	pthread_mutex_lock(&lock);
	while (ready < n) {
		pthread_cond_wait(&cond, &lock);
	}
	pthread_mutex_unlock(&lock);

	for (i = 0; i < n; i++) {
		cur_spec = lt[i].spec;
		assert_non_null(lt[i].r);
		assert_int_equal(evproxy_ringer_ring(lt[i].r), 0);
	}
	for (i = 0; i < n; i++) {
		cur_spec = lt[i].spec;
		assert_int_equal(pthread_join(lt[i].tid, NULL), 0);
		if (lt[i].error != NULL) {
			fail_msg("[%s%s] %s", lt[i].spec,
				 lt[i].use_loop_wait ? " loop_wait" : "",
				 lt[i].error);
		}
		CHECK_TRUE(lt[i].stop);
		CHECK_U64(lt[i].rings, 1);
		/* the loops are gone */
		assert_int_equal(evproxy_ringer_ring(lt[i].r), ECANCELED);
		evproxy_ringer_unref(lt[i].r);
	}
}

/* A work queue: producers push and ring, the handler drains. */
#define WQ_PRODUCERS 2

struct work_queue {
	pthread_mutex_t lock;
	uint64_t *items;	/* producer << 32 | sequence */
	uint64_t head, tail;	/* under lock */
	uint64_t per_producer;
	/* consumer, owner thread */
	uint64_t next[WQ_PRODUCERS];
	uint64_t consumed;
	uint64_t out_of_order;
	uint64_t rings;
	bool done;
};

struct producer {
	pthread_t tid;
	struct work_queue *q;
	struct evproxy_ringer *r;
	uint32_t id;
	uint64_t errors;
};

static void *producer_main(void *arg)
{
	struct producer *p = arg;
	struct work_queue *q = p->q;
	uint64_t i;

	for (i = 0; i < q->per_producer; i++) {
		pthread_mutex_lock(&q->lock);
		q->items[q->tail++] = ((uint64_t)p->id << 32) | i;
		pthread_mutex_unlock(&q->lock);
		if (evproxy_ringer_ring(p->r) != 0) {
			p->errors++;
		}
	}
	return NULL;
}

static void queue_handler(struct tevent_context *ev,
			  struct evproxy_doorbell *db, uint64_t rings,
			  void *private_data)
{
	struct work_queue *q = private_data;
	uint64_t head, tail, i;

	q->rings += rings;
	pthread_mutex_lock(&q->lock);
	head = q->head;
	tail = q->tail;
	q->head = tail;
	pthread_mutex_unlock(&q->lock);

	/* items below tail are complete and never touched again */
	for (i = head; i < tail; i++) {
		uint32_t id = (uint32_t)(q->items[i] >> 32);
		uint64_t seq = q->items[i] & 0xffffffffULL;

		if (id >= WQ_PRODUCERS || seq != q->next[id]) {
			q->out_of_order++;
			continue;
		}
		q->next[id]++;
		q->consumed++;
	}
	if (q->consumed + q->out_of_order ==
	    q->per_producer * WQ_PRODUCERS) {
		q->done = true;
	}
}

static void test_work_queue(void **state)
{
	static const char *const specs[] = {
		"epoll", "poll_mt", "evpoll-auto", "evpoll-always", NULL,
	};
	const char *const *spec;

	for (spec = specs; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_doorbell_stats st;
		struct work_queue q;
		struct producer p[WQ_PRODUCERS];
		uint64_t total;
		unsigned i;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		memset(&q, 0, sizeof(q));
		pthread_mutex_init(&q.lock, NULL);
		q.per_producer = tu_scale(50000);
		total = q.per_producer * WQ_PRODUCERS;
		q.items = talloc_array(mem, uint64_t, total);
		assert_non_null(q.items);
		db = evproxy_add_doorbell(ev, ev, queue_handler, &q);
		assert_non_null(db);

		memset(p, 0, sizeof(p));
		for (i = 0; i < WQ_PRODUCERS; i++) {
			p[i].q = &q;
			p[i].id = i;
			p[i].r = evproxy_doorbell_ringer(db);
			assert_non_null(p[i].r);
			assert_int_equal(pthread_create(&p[i].tid, NULL,
							producer_main, &p[i]),
					 0);
		}
		tu_loop_until(ev, &q.done, LOOP_TIMEOUT_MS);
		for (i = 0; i < WQ_PRODUCERS; i++) {
			assert_int_equal(pthread_join(p[i].tid, NULL), 0);
			CHECK_U64(p[i].errors, 0);
			evproxy_ringer_unref(p[i].r);
		}
		/* the last rings may come after the last item was taken */
		while (q.rings < total) {
			assert_int_equal(tevent_loop_once(ev), 0);
		}
		CHECK_U64(q.out_of_order, 0);
		CHECK_U64(q.consumed, total);
		for (i = 0; i < WQ_PRODUCERS; i++) {
			CHECK_U64(q.next[i], q.per_producer);
		}
		CHECK_U64(q.head, total);
		CHECK_U64(q.rings, total);
		st = get_stats(db);
		CHECK_U64(st.rings, total);
		CHECK_U64(st.pending, 0);
		pthread_mutex_destroy(&q.lock);
		talloc_free(mem);
	}
}

/* Rings from a signal handler. */
static struct evproxy_ringer *sig_ringer;
static atomic_uint sig_ring_errors;
static atomic_uint sig_errno_clobbered;

static void sig_ring(int sig)
{
	int saved = errno;
	int ret;

	errno = 4242;
	ret = evproxy_ringer_ring(sig_ringer);
	if (ret != 0) {
		atomic_fetch_add(&sig_ring_errors, 1);
	}
	if (errno != 4242) {
		atomic_fetch_add(&sig_errno_clobbered, 1);
	}
	errno = saved;
}

struct signaller {
	pthread_t tid;
	atomic_uint_fast64_t *delivered;
	uint64_t base;
	uint64_t rounds;
	bool timed_out;
	int error;
};

static void *signaller_main(void *arg)
{
	struct signaller *s = arg;
	uint64_t i;

	for (i = 0; i < s->rounds; i++) {
		int ret;

		if (i % 2 == 0) {
			/* to the process: usually the main thread */
			ret = kill(getpid(), SIGUSR1);
		} else {
			/* to this thread, which has no loop */
			ret = raise(SIGUSR1);
		}
		if (ret != 0) {
			s->error = errno;
			break;
		}
		if (!wait_ge(s->delivered, s->base + i + 1,
			     WAIT_TIMEOUT_MS)) {
			s->timed_out = true;
			break;
		}
	}
	return NULL;
}

static void test_ring_from_signal_handler(void **state)
{
	static const char *const specs[] = {
		"epoll", "poll", "evpoll-auto", "evpoll-always", NULL,
	};
	const char *const *spec;
	struct sigaction sa, old;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = sig_ring;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	assert_int_equal(sigaction(SIGUSR1, &sa, &old), 0);

	for (spec = specs; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct signaller s;
		uint64_t rounds = tu_scale(100);
		struct tally t = { .target = 1 };

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		sig_ringer = evproxy_doorbell_ringer(db);
		assert_non_null(sig_ringer);

		/* from the owner thread itself */
		assert_int_equal(raise(SIGUSR1), 0);
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_U64(t.rings, 1);

		/* from another thread, while the loop runs or sleeps */
		memset(&s, 0, sizeof(s));
		s.delivered = &t.published;
		s.base = 1;
		s.rounds = rounds;
		t.done = false;
		t.target = 1 + rounds;
		assert_int_equal(pthread_create(&s.tid, NULL, signaller_main,
						&s), 0);
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		assert_int_equal(pthread_join(s.tid, NULL), 0);
		assert_int_equal(s.error, 0);
		CHECK_TRUE(!s.timed_out);
		CHECK_U64(t.rings, 1 + rounds);
		CHECK_U64(t.calls, 1 + rounds);
		CHECK_U64(atomic_load(&sig_ring_errors), 0);
		CHECK_U64(atomic_load(&sig_errno_clobbered), 0);

		evproxy_ringer_unref(sig_ringer);
		sig_ringer = NULL;
		talloc_free(mem);
	}
	assert_int_equal(sigaction(SIGUSR1, &old, NULL), 0);
}

/* Rings from plain threads that have no tevent loop at all. */
static void test_ring_from_thread_without_loop(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct ringer_thread rt[2];
		uint64_t n = tu_scale(1000);
		struct tally t = { .target = 2 * n };
		unsigned i;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		memset(rt, 0, sizeof(rt));
		for (i = 0; i < 2; i++) {
			rt[i].r = evproxy_doorbell_ringer(db);
			rt[i].db = (i == 0) ? db : NULL;
			rt[i].count = n;
			assert_int_equal(pthread_create(&rt[i].tid, NULL,
							ringer_main, &rt[i]),
					 0);
		}
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		for (i = 0; i < 2; i++) {
			assert_int_equal(pthread_join(rt[i].tid, NULL), 0);
			CHECK_U64(rt[i].ok, n);
			evproxy_ringer_unref(rt[i].r);
		}
		CHECK_U64(t.rings, 2 * n);
		talloc_free(mem);
	}
}

/* evproxy_doorbell_fd(): readable exactly while a ring is pending. */
static void test_fd_readable_while_pending(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_doorbell_stats st;
		struct tally t = { .target = 1 };
		bool pinned = false;
		int fd;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		if (strcmp(*spec, "evpoll-always") == 0) {
			loop_until_spinning(ev);
		} else if (strcmp(*spec, "evpoll-auto") == 0) {
			evpoll_pin(ev);
			pinned = true;
			loop_until_spinning(ev);
		}

		/* rung before the export: a spinning loop skips the write */
		assert_int_equal(evproxy_ring_doorbell(db), 0);
		st = get_stats(db);
		CHECK_U64(st.kernel_wakeups,
			  evpoll_is_spinning(ev) ? 0 : 1);
		fd = evproxy_doorbell_fd(db);
		CHECK_TRUE(fd >= 0);
		CHECK_TRUE(fd_readable(fd));
		CHECK_U64(evproxy_doorbell_fd(db), fd);
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_TRUE(!fd_readable(fd));

		/* now every ring that makes it pending writes */
		t.done = false;
		t.target = 3;
		assert_int_equal(evproxy_ring_doorbell(db), 0);
		CHECK_TRUE(fd_readable(fd));
		assert_int_equal(evproxy_ring_doorbell(db), 0);
		CHECK_TRUE(fd_readable(fd));
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_TRUE(!fd_readable(fd));
		CHECK_U64(t.rings, 3);
		CHECK_U64(t.calls, 2);

		/* and an idle loop leaves it unreadable */
		run_for(ev, 5);
		CHECK_TRUE(!fd_readable(fd));
		if (pinned) {
			evpoll_unpin(ev);
			run_for(ev, 5);
			CHECK_TRUE(!fd_readable(fd));
		}
		st = get_stats(db);
		CHECK_U64(st.rings, 3);
		CHECK_U64(st.pending, 0);
		talloc_free(mem);
	}
}

/* A foreign loop: a thread waits in epoll_wait() on the doorbell's fd. */
struct foreign {
	pthread_t tid;
	const char *spec;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool ready;
	struct evproxy_ringer *r;	/* published under lock */
	atomic_bool stop;
	atomic_uint_fast64_t delivered;
	uint64_t rings;			/* foreign thread */
	uint64_t calls;
	uint64_t wakeups;
	const char *error;
};

static void foreign_handler(struct tevent_context *ev,
			    struct evproxy_doorbell *db, uint64_t rings,
			    void *private_data)
{
	struct foreign *f = private_data;

	f->calls++;
	f->rings += rings;
	atomic_store_explicit(&f->delivered, f->rings, memory_order_release);
}

static void foreign_publish(struct foreign *f, struct evproxy_ringer *r)
{
	pthread_mutex_lock(&f->lock);
	f->r = r;
	f->ready = true;
	pthread_cond_signal(&f->cond);
	pthread_mutex_unlock(&f->lock);
}

static void *foreign_main(void *arg)
{
	struct foreign *f = arg;
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev;
	struct evproxy_doorbell *db;
	struct epoll_event e = { .events = EPOLLIN };
	int fd, ep;

	ev = tu_context_try(mem, f->spec);
	db = ev != NULL ?
	     evproxy_add_doorbell(ev, ev, foreign_handler, f) : NULL;
	fd = db != NULL ? evproxy_doorbell_fd(db) : -1;
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (fd == -1 || ep == -1 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) != 0) {
		f->error = "set-up failed";
		foreign_publish(f, NULL);
		goto done;
	}
	foreign_publish(f, evproxy_doorbell_ringer(db));

	while (!atomic_load(&f->stop)) {
		int n = epoll_wait(ep, &e, 1, 1000);

		if (n == -1 && errno == EINTR) {
			continue;
		}
		if (n == -1) {
			f->error = "epoll_wait failed";
			break;
		}
		if (n == 0) {
			continue;
		}
		f->wakeups++;
		/* the fd is readable: run the owner loop once */
		if (tevent_loop_once(ev) != 0) {
			f->error = "tevent_loop_once failed";
			break;
		}
	}
done:
	if (ep != -1) {
		close(ep);
	}
	talloc_free(mem);
	return NULL;
}

static void test_foreign_loop(void **state)
{
	static const char *const specs[] = {
		"epoll", "poll", "evpoll-never", "evpoll-auto",
		"evpoll-always", NULL,
	};
	const char *const *spec;

	assert_true(evpoll_init());
	for (spec = specs; *spec != NULL; spec++) {
		struct foreign f;
		uint64_t rounds = tu_scale(1000);
		uint64_t i;

		cur_spec = *spec;
		memset(&f, 0, sizeof(f));
		f.spec = *spec;
		pthread_mutex_init(&f.lock, NULL);
		pthread_cond_init(&f.cond, NULL);
		assert_int_equal(pthread_create(&f.tid, NULL, foreign_main,
						&f), 0);
		pthread_mutex_lock(&f.lock);
		while (!f.ready) {
			pthread_cond_wait(&f.cond, &f.lock);
		}
		pthread_mutex_unlock(&f.lock);
		assert_non_null(f.r);

		for (i = 0; i < rounds; i++) {
			assert_int_equal(evproxy_ringer_ring(f.r), 0);
			CHECK_TRUE(wait_ge(&f.delivered, i + 1,
					   WAIT_TIMEOUT_MS));
		}
		atomic_store(&f.stop, true);
		assert_int_equal(evproxy_ringer_ring(f.r), 0);
		assert_int_equal(pthread_join(f.tid, NULL), 0);
		if (f.error != NULL) {
			fail_msg("[%s] %s", *spec, f.error);
		}
		/* the stop ring may or may not have been delivered */
		CHECK_TRUE(f.rings == rounds || f.rings == rounds + 1);
		CHECK_TRUE(f.calls == f.rings);
		CHECK_TRUE(f.wakeups >= rounds);
		assert_int_equal(evproxy_ringer_ring(f.r), ECANCELED);
		evproxy_ringer_unref(f.r);
		pthread_cond_destroy(&f.cond);
		pthread_mutex_destroy(&f.lock);
	}
}

/* ---------------------------------------------------------------------
 * 6. Lifetime
 */

static void test_ringer_after_free(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_ringer *r;
		struct tally t = { .target = 1 };

		cur_spec = *spec;

		/* the doorbell freed, with a ring pending */
		ev = tu_context(mem, *spec);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		r = evproxy_doorbell_ringer(db);
		assert_non_null(r);
		assert_int_equal(evproxy_ringer_ring(r), 0);
		talloc_free(db);
		assert_int_equal(evproxy_ringer_ring(r), ECANCELED);
		assert_int_equal(evproxy_ringer_ring(r), ECANCELED);
		/* the discarded ring is not delivered */
		run_for(ev, 5);
		CHECK_U64(t.calls, 0);
		evproxy_ringer_unref(r);

		/* the whole context freed, with its doorbell */
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		r = evproxy_doorbell_ringer(db);
		assert_non_null(r);
		assert_int_equal(evproxy_ringer_ring(r), 0);
		talloc_free(ev);
		assert_int_equal(evproxy_ringer_ring(r), ECANCELED);
		evproxy_ringer_unref(r);
		CHECK_U64(t.calls, 0);

		talloc_free(mem);
	}
}

/*
 * A doorbell that outlives its context (another talloc parent): no crash,
 * and freeing it afterwards is clean.
 */
static void test_doorbell_outlives_context(void **state)
{
	const char *const *spec;

	for (spec = tu_all_backends; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		TALLOC_CTX *other = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_ringer *r;
		struct tally t = { .target = 1 };
		int ret;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		if (strcmp(*spec, "evpoll-always") == 0) {
			loop_until_spinning(ev);
		}
		db = evproxy_add_doorbell(ev, other, tally_handler, &t);
		assert_non_null(db);
		r = evproxy_doorbell_ringer(db);
		assert_int_equal(evproxy_ring_doorbell(db), 0);
		talloc_free(mem);
		ret = evproxy_ringer_ring(r);
		CHECK_TRUE(ret == 0 || ret == ECANCELED);
		talloc_free(other);
		assert_int_equal(evproxy_ringer_ring(r), ECANCELED);
		evproxy_ringer_unref(r);
		CHECK_U64(t.calls, 0);
	}
}

struct ref_thread {
	pthread_t tid;
	struct evproxy_ringer *r;
	uint64_t count;
	uint64_t bad;
};

static void *ref_main(void *arg)
{
	struct ref_thread *rt = arg;
	uint64_t i;

	for (i = 0; i < rt->count; i++) {
		struct evproxy_ringer *x = evproxy_ringer_ref(rt->r);
		int ret;

		if (x != rt->r) {
			rt->bad++;
		}
		ret = evproxy_ringer_ring(x);
		if (ret != 0 && ret != ECANCELED) {
			rt->bad++;
		}
		evproxy_ringer_unref(x);
	}
	/* the thread's own reference, taken by the owner */
	evproxy_ringer_unref(rt->r);
	return NULL;
}

static void test_ringer_refcount(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "epoll");
	struct evproxy_doorbell *db;
	struct evproxy_ringer *r1, *r2, *r3;
	struct ref_thread rt[3];
	struct tally t = { .target = 1 };
	unsigned i;

	cur_spec = "epoll";
	assert_null(evproxy_ringer_ref(NULL));
	evproxy_ringer_unref(NULL);

	db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
	assert_non_null(db);
	r1 = evproxy_doorbell_ringer(db);
	assert_non_null(r1);
	r2 = evproxy_ringer_ref(r1);
	assert_ptr_equal(r2, r1);
	r3 = evproxy_doorbell_ringer(db);
	assert_ptr_equal(r3, r1);

	/* dropping some references leaves the others working */
	evproxy_ringer_unref(r3);
	assert_int_equal(evproxy_ringer_ring(r2), 0);
	tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
	CHECK_U64(t.rings, 1);

	/* refs and unrefs from threads while the doorbell is freed */
	memset(rt, 0, sizeof(rt));
	for (i = 0; i < 3; i++) {
		rt[i].r = evproxy_ringer_ref(r1);
		rt[i].count = tu_scale(20000);
		assert_int_equal(pthread_create(&rt[i].tid, NULL, ref_main,
						&rt[i]), 0);
	}
	talloc_free(db);
	assert_int_equal(evproxy_ringer_ring(r1), ECANCELED);
	evproxy_ringer_unref(r1);
	assert_int_equal(evproxy_ringer_ring(r2), ECANCELED);
	for (i = 0; i < 3; i++) {
		assert_int_equal(pthread_join(rt[i].tid, NULL), 0);
		CHECK_U64(rt[i].bad, 0);
	}
	/* the last reference: valgrind and ASan check the free */
	assert_int_equal(evproxy_ringer_ring(r2), ECANCELED);
	evproxy_ringer_unref(r2);
	talloc_free(mem);
}

static void test_free_in_handler(void **state)
{
	const char *const *spec;
	unsigned variant;

	/* 0: plain, 1: fd exported, 2: ring pending at the free */
	for (variant = 0; variant < 3; variant++) {
		for (spec = tu_all_backends; *spec != NULL; spec++) {
			TALLOC_CTX *mem = talloc_new(NULL);
			struct tevent_context *ev;
			struct evproxy_doorbell *db;
			struct evproxy_ringer *r;
			struct tally t = { .target = UINT64_MAX };
			struct tu_debug_log log;

			cur_spec = *spec;
			ev = tu_context(mem, *spec);
			tu_capture_debug(ev, &log);
			if (strcmp(*spec, "evpoll-always") == 0) {
				loop_until_spinning(ev);
			}
			db = evproxy_add_doorbell(ev, mem, tally_handler, &t);
			assert_non_null(db);
			t.free_db = &db;
			t.free_at = 3;
			r = evproxy_doorbell_ringer(db);
			if (variant == 1) {
				CHECK_TRUE(evproxy_doorbell_fd(db) >= 0);
			}
			assert_int_equal(evproxy_ringer_ring(r), 0);
			assert_int_equal(evproxy_ringer_ring(r), 0);
			assert_int_equal(evproxy_ringer_ring(r), 0);
			tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
			assert_null(db);
			CHECK_U64(t.calls, 1);
			CHECK_U64(t.rings, 3);
			assert_int_equal(evproxy_ringer_ring(r), ECANCELED);
			run_for(ev, 5);
			CHECK_U64(t.calls, 1);
			evproxy_ringer_unref(r);
			if (log.count != 0) {
				fail_msg("[%s] tevent reported: %s", *spec,
					 log.text);
			}
			talloc_free(mem);
		}
	}
}

/*
 * The handler rings again, lets a nested loop deliver that ring, and then
 * frees the doorbell. tevent_loop_allow_nesting() is deprecated but still
 * supported, and evpoll.h documents nested loops. The outer call comes
 * from the evpoll poll callback, the nested one from the eventfd's
 * tevent_fd (the exported fd makes the ring write), so tevent's own
 * limits on nested calls of one tevent_fd do not come into play.
 */
struct nested {
	struct evproxy_doorbell *db;
	unsigned free_in;	/* 1: the outer call frees, 2: the nested */
	uint64_t calls;
	bool done;
};

static void nested_handler(struct tevent_context *ev,
			   struct evproxy_doorbell *db, uint64_t rings,
			   void *private_data)
{
	struct nested *n = private_data;
	uint64_t me = ++n->calls;

	if (me == 1) {
		unsigned i;

		assert_int_equal(evproxy_ring_doorbell(db), 0);
		for (i = 0; i < 1000000 && n->calls == 1; i++) {
			assert_int_equal(tevent_loop_once(ev), 0);
		}
		assert_int_equal(n->calls, 2);
	}
	if (me == n->free_in && n->db != NULL) {
		talloc_free(db);
		n->db = NULL;
		n->done = true;
	}
}

static void test_free_after_nested_delivery(void **state)
{
	unsigned free_in;

	for (free_in = 1; free_in <= 2; free_in++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct nested n = { .free_in = free_in };

		cur_spec = free_in == 1 ? "evpoll-always, outer frees" :
					  "evpoll-always, nested frees";
		ev = tu_context(mem, "evpoll-always");
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
		tevent_loop_allow_nesting(ev);
#pragma GCC diagnostic pop
		loop_until_spinning(ev);
		n.db = evproxy_add_doorbell(ev, mem, nested_handler, &n);
		assert_non_null(n.db);
		CHECK_TRUE(evproxy_doorbell_fd(n.db) >= 0);
		assert_int_equal(evproxy_ring_doorbell(n.db), 0);
		tu_loop_until(ev, &n.done, LOOP_TIMEOUT_MS);
		assert_null(n.db);
		CHECK_U64(n.calls, 2);
		run_for(ev, 5);
		CHECK_U64(n.calls, 2);
		talloc_free(mem);
	}
}

/* Threads ring through ringers until the owner frees the doorbell. */
struct hammer {
	pthread_t tid;
	struct evproxy_ringer *r;
	uint64_t ok;
	uint64_t canceled;
	uint64_t other;
};

static void *hammer_main(void *arg)
{
	struct hammer *h = arg;
	unsigned j;
	uint64_t i;

	for (i = 0; i < 100000000; i++) {
		int ret = evproxy_ringer_ring(h->r);

		if (ret == 0) {
			h->ok++;
			continue;
		}
		if (ret != ECANCELED) {
			h->other++;
			break;
		}
		h->canceled++;
		/* dead stays dead */
		for (j = 0; j < 3; j++) {
			if (evproxy_ringer_ring(h->r) != ECANCELED) {
				h->other++;
			}
		}
		break;
	}
	return NULL;
}

#define HAMMERS 3

static void test_free_while_ringing(void **state)
{
	static const char *const specs[] = {
		"epoll", "evpoll-always", "evpoll-auto", "poll_mt",
	};
	uint64_t rounds = tu_scale(300);
	uint64_t round, total_ok = 0;

	for (round = 0; round < rounds; round++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct hammer h[HAMMERS];
		struct tally t = { .target = 3 };
		unsigned variant = round % 3;
		unsigned i;

		cur_spec = specs[round % 4];
		ev = tu_context(mem, cur_spec);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		if (variant == 1) {
			/* the handler frees it */
			t.free_db = &db;
			t.free_at = 3;
		}
		memset(h, 0, sizeof(h));
		for (i = 0; i < HAMMERS; i++) {
			h[i].r = evproxy_doorbell_ringer(db);
			assert_non_null(h[i].r);
			assert_int_equal(pthread_create(&h[i].tid, NULL,
							hammer_main, &h[i]),
					 0);
		}
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		if (variant == 0) {
			talloc_free(db);
		} else if (variant == 1) {
			assert_null(db);
		} else {
			talloc_free(ev);
		}
		for (i = 0; i < HAMMERS; i++) {
			assert_int_equal(pthread_join(h[i].tid, NULL), 0);
			CHECK_U64(h[i].other, 0);
			CHECK_U64(h[i].canceled, 1);
			total_ok += h[i].ok;
			evproxy_ringer_unref(h[i].r);
		}
		talloc_free(mem);
	}
	CHECK_TRUE(total_ok >= 3 * rounds);
}

/* ---------------------------------------------------------------------
 * 7. Errors
 */

static void never_called(struct tevent_context *ev,
			 struct evproxy_doorbell *db, uint64_t rings,
			 void *private_data)
{
	fail_msg("handler called");
}

static void test_invalid_arguments(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "epoll");
	struct evproxy_doorbell *db;
	struct evproxy_doorbell_stats st;

	errno = 0;
	assert_null(evproxy_add_doorbell(NULL, mem, never_called, NULL));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evproxy_add_doorbell(ev, mem, NULL, NULL));
	assert_int_equal(errno, EINVAL);
	assert_int_equal(talloc_total_blocks(mem), talloc_total_blocks(ev) + 1);

	assert_int_equal(evproxy_ring_doorbell(NULL), EINVAL);
	assert_int_equal(evproxy_ringer_ring(NULL), EINVAL);
	errno = 0;
	assert_int_equal(evproxy_doorbell_fd(NULL), -1);
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evproxy_doorbell_ringer(NULL));
	assert_int_equal(errno, EINVAL);
	assert_int_equal(evproxy_doorbell_get_stats(NULL, &st), EINVAL);

	db = evproxy_add_doorbell(ev, mem, never_called, NULL);
	assert_non_null(db);
	assert_int_equal(evproxy_doorbell_get_stats(db, NULL), EINVAL);
	/* a NULL talloc parent works too */
	talloc_free(db);
	db = evproxy_add_doorbell(ev, NULL, never_called, NULL);
	assert_non_null(db);
	talloc_free(db);
	talloc_free(mem);
}

static void test_fd_exhaustion(void **state)
{
	static const char *const specs[] = {
		"epoll", "evpoll-auto", NULL,
	};
	const char *const *spec;

	for (spec = specs; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct rlimit old, lim;
		size_t size, blocks;
		int *fds, nfds = 0, free_fd, err;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		size = talloc_total_size(mem);
		blocks = talloc_total_blocks(mem);
		free_fd = lowest_free_fd();

		/* take every fd number below the (lowered) limit */
		assert_int_equal(getrlimit(RLIMIT_NOFILE, &old), 0);
		lim = old;
		lim.rlim_cur = 256;
		if (old.rlim_cur < lim.rlim_cur) {
			lim.rlim_cur = old.rlim_cur;
		}
		assert_int_equal(setrlimit(RLIMIT_NOFILE, &lim), 0);
		fds = calloc(lim.rlim_cur, sizeof(int));
		assert_non_null(fds);
		for (;;) {
			int fd = dup(0);

			if (fd == -1) {
				err = errno;
				break;
			}
			fds[nfds++] = fd;
		}
		assert_int_equal(err, EMFILE);

		errno = 0;
		db = evproxy_add_doorbell(ev, mem, never_called, NULL);
		err = errno;

		while (nfds > 0) {
			close(fds[--nfds]);
		}
		free(fds);
		assert_int_equal(setrlimit(RLIMIT_NOFILE, &old), 0);

		assert_null(db);
		assert_int_equal(err, EMFILE);
		CHECK_U64(talloc_total_size(mem), size);
		CHECK_U64(talloc_total_blocks(mem), blocks);
		CHECK_U64(lowest_free_fd(), free_fd);

		/* and it works once fds are available again */
		db = evproxy_add_doorbell(ev, mem, never_called, NULL);
		assert_non_null(db);
		talloc_free(mem);
	}
}

/*
 * Allocation failures at every step (talloc memory limits): NULL with
 * ENOMEM, and nothing leaked, neither memory nor the eventfd.
 */
static void test_no_memory(void **state)
{
	static const char *const specs[] = {
		"epoll", "evpoll-auto", "evpoll-always", NULL,
	};
	const char *const *spec;

	for (spec = specs; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		size_t limit;
		unsigned failures = 0;
		bool made = false;
		int free_fd;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		free_fd = lowest_free_fd();
		for (limit = 1; limit < 65536 && !made; limit += 8) {
			TALLOC_CTX *lim = talloc_new(mem);
			struct evproxy_doorbell *db;
			int ret;

			assert_non_null(lim);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
			ret = talloc_set_memlimit(lim, limit);
#pragma GCC diagnostic pop
			assert_int_equal(ret, 0);
			errno = 0;
			db = evproxy_add_doorbell(ev, lim, never_called, NULL);
			if (db == NULL) {
				assert_int_equal(errno, ENOMEM);
				CHECK_U64(talloc_total_blocks(lim), 1);
				CHECK_U64(lowest_free_fd(), free_fd);
				failures++;
			} else {
				made = true;
			}
			talloc_free(lim);
		}
		CHECK_TRUE(failures > 0);
		CHECK_TRUE(made);
		CHECK_U64(lowest_free_fd(), free_fd);
		talloc_free(mem);
	}
}

/* ---------------------------------------------------------------------
 * 8. fork()
 */

static int child_checks(struct evproxy_doorbell *inherited,
			struct evproxy_ringer *r)
{
	static const char *const specs[] = { "epoll", "evpoll-always", NULL };
	const char *const *spec;

	if (evproxy_ring_doorbell(inherited) != ECANCELED) {
		return 10;
	}
	if (evproxy_ringer_ring(r) != ECANCELED) {
		return 11;
	}
	for (spec = specs; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context_try(mem, *spec);
		struct evproxy_doorbell *db;
		struct tally t = { .target = 2 };
		unsigned i;

		if (ev == NULL) {
			return 12;
		}
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		if (db == NULL) {
			return 13;
		}
		if (evproxy_ring_doorbell(db) != 0 ||
		    evproxy_ring_doorbell(db) != 0) {
			return 14;
		}
		for (i = 0; i < 1000000 && !t.done; i++) {
			if (tevent_loop_once(ev) != 0) {
				return 15;
			}
		}
		if (t.calls != 1 || t.rings != 2) {
			return 16;
		}
		talloc_free(mem);
	}
	return 0;
}

static void test_fork(void **state)
{
	static const char *const specs[] = { "epoll", "evpoll-always", NULL };
	const char *const *spec;

	for (spec = specs; *spec != NULL; spec++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct evproxy_ringer *r;
		struct evproxy_doorbell_stats st;
		struct tally t = { .target = 1 };
		pid_t pid;
		int status;

		cur_spec = *spec;
		ev = tu_context(mem, *spec);
		db = evproxy_add_doorbell(ev, ev, tally_handler, &t);
		assert_non_null(db);
		r = evproxy_doorbell_ringer(db);
		if (strcmp(*spec, "evpoll-always") == 0) {
			loop_until_spinning(ev);
		}

		pid = fork();
		assert_int_not_equal(pid, -1);
		if (pid == 0) {
			_exit(child_checks(db, r));
		}
		assert_int_equal(waitpid(pid, &status, 0), pid);
		CHECK_TRUE(WIFEXITED(status));
		CHECK_U64(WEXITSTATUS(status), 0);

		/* the child's rings did not reach the parent */
		st = get_stats(db);
		CHECK_U64(st.kernel_wakeups, 0);
		CHECK_U64(st.pending, 0);
		CHECK_TRUE(!fd_readable(evproxy_doorbell_fd(db)));
		run_for(ev, 5);
		CHECK_U64(t.calls, 0);

		/* the parent's doorbell still works */
		assert_int_equal(evproxy_ringer_ring(r), 0);
		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_U64(t.calls, 1);
		CHECK_U64(t.rings, 1);
		evproxy_ringer_unref(r);
		talloc_free(mem);
	}
}

/*
 * A doorbell whose eventfd number is known without evproxy_doorbell_fd()
 * (which would change how rings behave): the eventfd takes the lowest
 * free fd number.
 */
static struct evproxy_doorbell *doorbell_with_efd(struct tevent_context *ev,
						  struct tally *t, int *efd)
{
	struct evproxy_doorbell *db;
	char path[64], link[64];
	ssize_t len;

	*efd = lowest_free_fd();
	db = evproxy_add_doorbell(ev, ev, tally_handler, t);
	assert_non_null(db);
	snprintf(path, sizeof(path), "/proc/self/fd/%d", *efd);
	len = readlink(path, link, sizeof(link) - 1);
	assert_true(len > 0);
	link[len] = '\0';
	assert_string_equal(link, "anon_inode:[eventfd]");
	return db;
}

/*
 * A child that frees the inherited doorbell (or its whole context, as a
 * child about to do its own work does) must not wake the parent either:
 * the parent's loop spins with a ring pending, so its eventfd is idle.
 */
static void test_fork_child_frees_inherited(void **state)
{
	unsigned variant;

	for (variant = 0; variant < 2; variant++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct tally t = { .target = 1 };
		int status, efd;
		pid_t pid;

		cur_spec = variant == 0 ? "evpoll-always, free doorbell" :
					  "evpoll-always, free context";
		ev = tu_context(mem, "evpoll-always");
		loop_until_spinning(ev);
		db = doorbell_with_efd(ev, &t, &efd);
		assert_int_equal(evproxy_ring_doorbell(db), 0);
		CHECK_U64(get_stats(db).kernel_wakeups, 0);
		CHECK_TRUE(!fd_readable(efd));

		pid = fork();
		assert_int_not_equal(pid, -1);
		if (pid == 0) {
			talloc_free(variant == 0 ? (void *)db : (void *)ev);
			/* the rest too, for valgrind's leak check at exit */
			talloc_free(mem);
			_exit(0);
		}
		assert_int_equal(waitpid(pid, &status, 0), pid);
		CHECK_TRUE(WIFEXITED(status));
		CHECK_U64(WEXITSTATUS(status), 0);
		CHECK_TRUE(!fd_readable(efd));

		tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
		CHECK_U64(t.rings, 1);
		talloc_free(mem);
	}
}

/*
 * A child that keeps running the loop it inherited (tevent's epoll backend
 * supports that, Samba's forked children do it): the inherited doorbell is
 * dead there, so its handler must not run in the child, and the child must
 * not consume the parent's wake-ups from the shared eventfd.
 *
 * Variants: 0 "epoll", the parent rings after the fork; 1 "epoll", a ring
 * is pending at the fork; 2 "evpoll-always" spinning, a ring is pending at
 * the fork (no eventfd write).
 */
static void test_fork_child_runs_inherited_loop(void **state)
{
	char problems[1024] = "";
	unsigned variant;

	for (variant = 0; variant < 3; variant++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		const char *spec = variant < 2 ? "epoll" : "evpoll-always";
		struct tevent_context *ev;
		struct evproxy_doorbell *db;
		struct tally t = { .target = 1 };
		int status, efd, go[2];
		bool readable = true;
		pid_t pid;
		char c = 'x';

		cur_spec = spec;
		ev = tu_context(mem, spec);
		if (variant == 2) {
			loop_until_spinning(ev);
		}
		db = doorbell_with_efd(ev, &t, &efd);
		if (variant > 0) {
			assert_int_equal(evproxy_ring_doorbell(db), 0);
		}
		assert_int_equal(pipe(go), 0);

		pid = fork();
		assert_int_not_equal(pid, -1);
		if (pid == 0) {
			bool fired = false;
			unsigned i;

			if (read(go[0], &c, 1) != 1) {
				_exit(20);
			}
			/* run the inherited loop for a while */
			if (tevent_add_timer(ev, ev,
					     tevent_timeval_current_ofs(0,
									20000),
					     timer_fired, &fired) == NULL) {
				_exit(21);
			}
			for (i = 0; i < 1000000 && !fired; i++) {
				if (tevent_loop_once(ev) != 0) {
					_exit(22);
				}
			}
			_exit(t.calls == 0 ? 0 : 1);
		}
		if (variant == 0) {
			assert_int_equal(evproxy_ring_doorbell(db), 0);
		}
		assert_int_equal(write(go[1], &c, 1), 1);
		assert_int_equal(waitpid(pid, &status, 0), pid);
		close(go[0]);
		close(go[1]);
		CHECK_TRUE(WIFEXITED(status));
		if (WEXITSTATUS(status) == 1) {
			snprintf(problems + strlen(problems),
				 sizeof(problems) - strlen(problems),
				 "\n  variant %u (%s): the handler ran in the "
				 "child for the parent's ring", variant, spec);
		} else {
			CHECK_U64(WEXITSTATUS(status), 0);
		}
		if (variant < 2) {
			readable = fd_readable(efd);
		}
		if (!readable) {
			snprintf(problems + strlen(problems),
				 sizeof(problems) - strlen(problems),
				 "\n  variant %u (%s): the child drained the "
				 "parent's eventfd, the parent's pending ring "
				 "has no wake-up", variant, spec);
		} else {
			/* the parent's ring is delivered in the parent */
			tu_loop_until(ev, &t.done, LOOP_TIMEOUT_MS);
			CHECK_U64(t.rings, 1);
		}
		talloc_free(mem);
	}
	if (problems[0] != '\0') {
		fail_msg("inherited doorbell in a forked child:%s", problems);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup_watchdog, \
					     teardown_watchdog)
		T(test_every_backend),
		T(test_ring_from_handler),
		T(test_two_doorbells),
		T(test_concurrent_coalescing),
		T(test_pending_rings_no_syscall),
		T(test_spinning_no_syscall),
		T(test_sleeping_one_syscall),
		T(test_ring_is_activity),
		T(test_shutdown_threads),
		T(test_work_queue),
		T(test_ring_from_signal_handler),
		T(test_ring_from_thread_without_loop),
		T(test_fd_readable_while_pending),
		T(test_foreign_loop),
		T(test_ringer_after_free),
		T(test_doorbell_outlives_context),
		T(test_ringer_refcount),
		T(test_free_in_handler),
		T(test_free_after_nested_delivery),
		T(test_free_while_ringing),
		T(test_invalid_arguments),
		T(test_fd_exhaustion),
		T(test_no_memory),
		T(test_fork),
		T(test_fork_child_frees_inherited),
		T(test_fork_child_runs_inherited_loop),
#undef T
	};

	/* threads allocate top-level talloc chunks */
	talloc_disable_null_tracking();
	return cmocka_run_group_tests(tests, NULL, NULL);
}
