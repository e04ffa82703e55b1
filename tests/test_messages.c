/*
 * Tests of evproxy's cross-thread messages (include/evproxy.h): delivery
 * on every backend, FIFO order per sender and exact counts under
 * concurrency (unbounded and bounded queues), the ownership rules of a
 * message, destruction of the destination (also racing with senders),
 * backpressure with evproxy_send_send(), batching, kernel wake-up counts,
 * request/reply between two loops, fan-in, the tevent_thread_proxy
 * drop-in, argument checks and re-entrancy.
 *
 * Checks made off the cmocka thread (worker threads, handlers) go through
 * TU_CHECK(), which counts failures; each test asserts the count is 0. Leaks
 * and use-after-free are left to valgrind and the sanitizers (messages may
 * carry no destructor, so the tests cannot watch them being freed).
 *
 * Run one test: test_messages 'test_fifo*' (a cmocka filter pattern).
 */

#define TEVENT_DEPRECATED	/* tevent_loop_allow_nesting() */

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <talloc.h>
#include <tevent.h>

#include "evpoll.h"
#include "evproxy.h"
#include "testutil.h"

#define TMSG_MAGIC 0x4d534721u
#define LONG_MS 120000	/* only reached when a test fails */


/* ------------------------------------------------------------------ */
/* Messages */

enum tmsg_mode {
	MODE_DROP = 0,		/* handler leaves it to the library */
	MODE_KEEP,		/* handler steals it */
	MODE_FREE,		/* handler frees it */
	MODE_KEEP_CHILD,	/* handler steals only its child */
	MODE_REQUEST,
	MODE_REPLY,
	MODE_STOP,
};

struct tmsg {
	uint32_t magic;
	uint32_t producer;
	uint64_t seq;
	enum tmsg_mode mode;
	void *dest;		/* for handlers without private_data */
	char *child;
};

static struct tmsg *tmsg_new(uint32_t producer, uint64_t seq)
{
	struct tmsg *m = evproxy_msg_new(sizeof(*m), "struct tmsg");

	if (m == NULL) {
		return NULL;
	}
	m->magic = TMSG_MAGIC;
	m->producer = producer;
	m->seq = seq;
	return m;
}

/* A message with a talloc child, to check whole trees move and go. */
static struct tmsg *tmsg_new_child(uint32_t producer, uint64_t seq)
{
	struct tmsg *m = tmsg_new(producer, seq);

	if (m == NULL) {
		return NULL;
	}
	m->child = talloc_asprintf(m, "child %u/%llu", (unsigned)producer,
				   (unsigned long long)seq);
	if (m->child == NULL) {
		talloc_free(m);
		return NULL;
	}
	return m;
}

static bool tmsg_child_ok(const struct tmsg *m)
{
	char buf[64];

	snprintf(buf, sizeof(buf), "child %u/%llu", (unsigned)m->producer,
		 (unsigned long long)m->seq);
	return m->child != NULL && strcmp(m->child, buf) == 0;
}

static struct tmsg *tmsg_get(void *msg)
{
	struct tmsg *m = talloc_get_type(msg, struct tmsg);

	TU_CHECK(m != NULL);
	if (m != NULL) {
		TU_CHECK(m->magic == TMSG_MAGIC);
	}
	return m;
}

/* ------------------------------------------------------------------ */
/* Loops */

/* A timer that fires every 20 ms, so a loop never blocks for good. */
static void tick(struct tevent_context *ev, struct tevent_timer *te,
		 struct timeval now, void *private_data)
{
	TALLOC_CTX *owner = private_data;

	tevent_add_timer(ev, owner, tevent_timeval_current_ofs(0, 20000),
			 tick, owner);
}

static TALLOC_CTX *ticker_start(struct tevent_context *ev)
{
	TALLOC_CTX *owner = talloc_new(NULL);

	if (owner == NULL) {
		return NULL;
	}
	tick(ev, NULL, tevent_timeval_zero(), owner);
	return owner;
}

/* tu_loop_until() that cannot block for good when nothing comes. */
static void loop_until(struct tevent_context *ev, const bool *done,
		       unsigned timeout_ms)
{
	TALLOC_CTX *ticker = ticker_start(ev);

	assert_non_null(ticker);
	tu_loop_until(ev, done, timeout_ms);
	talloc_free(ticker);
}

/* The same off the cmocka thread; false on timeout or loop error. */
static bool thread_loop_until(struct tevent_context *ev, const bool *done,
			      unsigned timeout_ms)
{
	uint64_t deadline = tu_now_ns() + (uint64_t)timeout_ms * 1000000ULL;
	TALLOC_CTX *ticker = ticker_start(ev);
	bool ok = true;

	while (!*done) {
		if (tevent_loop_once(ev) != 0 || tu_now_ns() > deadline) {
			ok = false;
			break;
		}
	}
	talloc_free(ticker);
	return ok;
}

static void set_flag(struct tevent_context *ev, struct tevent_timer *te,
		     struct timeval now, void *private_data)
{
	bool *flag = private_data;

	*flag = true;
}

/* Run the loop for about @ms milliseconds. */
static void loop_for(struct tevent_context *ev, unsigned ms)
{
	bool fired = false;
	struct tevent_timer *te;

	te = tevent_add_timer(ev, NULL,
			      tevent_timeval_current_ofs(ms / 1000,
							 (ms % 1000) * 1000),
			      set_flag, &fired);
	assert_non_null(te);
	tu_loop_until(ev, &fired, LONG_MS);
}

static struct evproxy *proxy_new(TALLOC_CTX *mem_ctx,
				 struct tevent_context *ev, size_t capacity,
				 unsigned batch)
{
	struct evproxy_config cfg;
	struct evproxy *p;

	evproxy_config_default(&cfg);
	cfg.capacity = capacity;
	if (batch != 0) {
		cfg.batch = batch;
	}
	p = evproxy_create(mem_ctx, ev, &cfg);
	assert_non_null(p);
	return p;
}

static void stats_get(struct evproxy *p, struct evproxy_stats *st)
{
	assert_int_equal(evproxy_get_stats(p, st), 0);
}

/* ------------------------------------------------------------------ */
/* 1. Basic delivery on every backend */

#define BASIC_COOKIE 0x600d600du

struct basic_state {
	uint32_t cookie;	/* tells the handler got our private_data */
	unsigned calls;
	bool done;
	bool private_ok;
	struct tmsg last;
	char child[64];
};

static void basic_handler(struct tevent_context *ev, void *msg,
			  void *private_data)
{
	struct basic_state *st = private_data;
	struct tmsg *m = tmsg_get(msg);

	st->private_ok = st->cookie == BASIC_COOKIE;
	st->calls++;
	st->done = true;
	if (m == NULL) {
		return;
	}
	TU_CHECK(tmsg_child_ok(m));
	st->last = *m;
	snprintf(st->child, sizeof(st->child), "%s", m->child);
}

struct basic_sender {
	struct evproxy_sender *s;
	struct basic_state *st;
	int ret;
	bool nulled;
};

static void *basic_thread(void *arg)
{
	struct basic_sender *b = arg;
	struct tmsg *m = tmsg_new_child(7, 42);

	TU_CHECK(m != NULL);
	b->ret = evproxy_send(b->s, basic_handler, b->st, &m);
	b->nulled = m == NULL;
	if (m != NULL) {
		talloc_free(m);
	}
	return NULL;
}

static void test_basic_delivery(void **state)
{
	unsigned i;

	tu_checks_reset();
	for (i = 0; tu_all_backends[i] != NULL; i++) {
		struct tevent_context *ev = tu_context(NULL,
						       tu_all_backends[i]);
		struct evproxy *p = proxy_new(ev, ev, 0, 0);
		struct evproxy_sender *s = evproxy_sender(p);
		struct basic_state st = { .cookie = BASIC_COOKIE };
		struct basic_sender b = { .s = s, .st = &st };
		struct evproxy_stats stats;
		struct tmsg *m = tmsg_new_child(1, 5);
		pthread_t t;

		assert_non_null(s);
		assert_non_null(m);

		/* from the owner thread */
		assert_int_equal(evproxy_send(s, basic_handler, &st, &m), 0);
		assert_null(m);
		loop_until(ev, &st.done, LONG_MS);
		assert_int_equal(st.calls, 1);
		assert_true(st.private_ok);
		assert_int_equal(st.last.producer, 1);
		assert_int_equal(st.last.seq, 5);
		assert_string_equal(st.child, "child 1/5");

		/* from another thread */
		st.done = false;
		st.private_ok = false;
		assert_int_equal(pthread_create(&t, NULL, basic_thread, &b),
				 0);
		loop_until(ev, &st.done, LONG_MS);
		assert_int_equal(pthread_join(t, NULL), 0);
		assert_int_equal(b.ret, 0);
		assert_true(b.nulled);
		assert_int_equal(st.calls, 2);
		assert_true(st.private_ok);
		assert_int_equal(st.last.producer, 7);
		assert_int_equal(st.last.seq, 42);
		assert_string_equal(st.child, "child 7/42");

		/* nothing else arrives */
		loop_for(ev, 5);
		assert_int_equal(st.calls, 2);
		stats_get(p, &stats);
		assert_int_equal(stats.delivered, 2);
		assert_int_equal(stats.discarded, 0);
		assert_true(stats.batches >= 1 && stats.batches <= 2);

		talloc_free(ev);
		evproxy_sender_unref(s);
	}
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 2. FIFO per sender, exact counts; 9b. fan-in */

struct fifo_dest {
	unsigned nproducers;
	uint64_t *next;		/* per producer: next expected seq */
	uint64_t delivered;
	uint64_t expected;
	bool done;
};

static void fifo_handler(struct tevent_context *ev, void *msg,
			 void *private_data)
{
	struct fifo_dest *d = private_data;
	struct tmsg *m = tmsg_get(msg);

	d->delivered++;
	if (d->delivered >= d->expected) {
		d->done = true;
	}
	if (m == NULL) {
		return;
	}
	TU_CHECK(m->producer < d->nproducers);
	if (m->producer >= d->nproducers) {
		return;
	}
	/* strictly increasing, no gap, no duplicate */
	TU_CHECK(m->seq == d->next[m->producer]);
	d->next[m->producer] = m->seq + 1;
}

struct producer {
	pthread_t thread;
	struct evproxy_sender *s;
	evproxy_msg_handler_t handler;
	void *private_data;
	uint32_t id;
	uint64_t count;
	uint64_t eagain;
};

static void *producer_main(void *arg)
{
	struct producer *pr = arg;
	uint64_t seq;

	for (seq = 0; seq < pr->count; seq++) {
		struct tmsg *m = tmsg_new(pr->id, seq);
		struct tmsg *orig = m;
		int ret;

		TU_CHECK(m != NULL);
		if (m == NULL) {
			return NULL;
		}
		for (;;) {
			ret = evproxy_send(pr->s, pr->handler,
					   pr->private_data, &m);
			if (ret != EAGAIN) {
				break;
			}
			/* still ours, untouched */
			TU_CHECK(m == orig && m->seq == seq);
			pr->eagain++;
			sched_yield();
		}
		TU_CHECK(ret == 0);
		TU_CHECK(m == NULL);
		if (m != NULL) {
			talloc_free(m);
			return NULL;
		}
	}
	return NULL;
}

static void run_fifo(const char *spec, size_t capacity, unsigned nproducers,
		     uint64_t count)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, spec);
	struct evproxy *p = proxy_new(ev, ev, capacity, 0);
	struct producer *pr = talloc_zero_array(mem, struct producer,
						nproducers);
	struct fifo_dest d = {
		.nproducers = nproducers,
		.next = talloc_zero_array(mem, uint64_t, nproducers),
		.expected = nproducers * count,
	};
	struct evproxy_stats stats;
	uint64_t eagain = 0;
	uint64_t t0 = tu_now_ns();
	unsigned i;

	assert_non_null(pr);
	assert_non_null(d.next);
	for (i = 0; i < nproducers; i++) {
		pr[i].s = evproxy_sender(p);
		pr[i].handler = fifo_handler;
		pr[i].private_data = &d;
		pr[i].id = i;
		pr[i].count = count;
		assert_non_null(pr[i].s);
		assert_int_equal(pthread_create(&pr[i].thread, NULL,
						producer_main, &pr[i]), 0);
	}
	loop_until(ev, &d.done, LONG_MS);
	for (i = 0; i < nproducers; i++) {
		assert_int_equal(pthread_join(pr[i].thread, NULL), 0);
		evproxy_sender_unref(pr[i].s);
		eagain += pr[i].eagain;
	}
	/* no duplicate arrives late */
	loop_for(ev, 2);
	assert_int_equal(d.delivered, nproducers * count);
	for (i = 0; i < nproducers; i++) {
		assert_int_equal(d.next[i], count);
	}
	stats_get(p, &stats);
	assert_int_equal(stats.delivered, nproducers * count);
	assert_int_equal(stats.discarded, 0);
	if (capacity == 0) {
		assert_int_equal(eagain, 0);
	}
	print_message("    %-14s cap %-3zu %u x %llu: %.0f ms, %llu EAGAIN, "
		      "%llu kernel wake-ups, %llu batches\n", spec, capacity,
		      nproducers, (unsigned long long)count,
		      (tu_now_ns() - t0) / 1e6, (unsigned long long)eagain,
		      (unsigned long long)stats.kernel_wakeups,
		      (unsigned long long)stats.batches);
	talloc_free(mem);
	tu_checks_assert();
}

static const char *const fifo_specs[] = {
	"epoll", "evpoll-auto", "evpoll-always", NULL,
};

static void test_fifo_unbounded(void **state)
{
	unsigned i;

	tu_checks_reset();
	for (i = 0; fifo_specs[i] != NULL; i++) {
		run_fifo(fifo_specs[i], 0, 4, tu_scale(50000));
	}
}

static void test_fifo_bounded(void **state)
{
	unsigned i;

	tu_checks_reset();
	for (i = 0; fifo_specs[i] != NULL; i++) {
		/* producers take turns on 8 slots: fewer messages */
		run_fifo(fifo_specs[i], 8, 4, tu_scale(10000));
	}
}

static void test_fan_in(void **state)
{
	tu_checks_reset();
	run_fifo("epoll", 0, 8, tu_scale(20000));
	run_fifo("evpoll-auto", 0, 8, tu_scale(20000));
	run_fifo("epoll", 64, 8, tu_scale(5000));
}

/* ------------------------------------------------------------------ */
/* 3. Ownership in the handler */

struct own_state {
	TALLOC_CTX *keep;
	struct tmsg **kept;
	unsigned nkept;
	char **kept_children;
	unsigned nkept_children;
	uint64_t delivered;
	uint64_t expected;
	bool done;
};

static void own_handler(struct tevent_context *ev, void *msg,
			void *private_data)
{
	struct own_state *st = private_data;
	struct tmsg *m = tmsg_get(msg);

	st->delivered++;
	st->done = st->delivered >= st->expected;
	if (m == NULL) {
		return;
	}
	TU_CHECK(tmsg_child_ok(m));
	TU_CHECK(talloc_get_size(m) == sizeof(*m));
	switch (m->mode) {
	case MODE_DROP:
		break;
	case MODE_KEEP:
		st->kept[st->nkept++] = talloc_steal(st->keep, m);
		break;
	case MODE_FREE:
		TU_CHECK(talloc_free(m) == 0);
		break;
	case MODE_KEEP_CHILD:
		st->kept_children[st->nkept_children++] =
			talloc_steal(st->keep, m->child);
		break;
	default:
		TU_CHECK(false);
		break;
	}
}

struct own_sender {
	struct evproxy_sender *s;
	struct own_state *st;
	unsigned n;
};

static void *own_thread(void *arg)
{
	struct own_sender *os = arg;
	unsigned i;

	for (i = 0; i < os->n; i++) {
		struct tmsg *m = tmsg_new_child(1, i);

		TU_CHECK(m != NULL);
		if (m == NULL) {
			return NULL;
		}
		m->mode = (enum tmsg_mode)(i % 4);
		TU_CHECK(evproxy_send(os->s, own_handler, os->st, &m) == 0);
		TU_CHECK(m == NULL);
	}
	return NULL;
}

/* Bytes in use by malloc (main arena and mmapped); 0 under ASan. */
static size_t heap_in_use(void)
{
	struct mallinfo2 mi = mallinfo2();

	return mi.uordblks + mi.hblkhd;
}

static void big_drop_handler(struct tevent_context *ev, void *msg,
			     void *private_data)
{
	bool *done = private_data;
	unsigned char *b = msg;

	TU_CHECK(b[0] == 0xab && b[talloc_get_size(msg) - 1] == 0xcd);
	*done = true;
}

static void test_ownership_in_handler(void **state)
{
	const char *specs[] = { "epoll", "evpoll-always", NULL };
	unsigned i, k;

	tu_checks_reset();
	for (i = 0; specs[i] != NULL; i++) {
		struct tevent_context *ev = tu_context(NULL, specs[i]);
		struct evproxy *p = proxy_new(ev, ev, 0, 0);
		struct own_state st = { .expected = 400 };
		struct own_sender os = {
			.s = evproxy_sender(p), .st = &st, .n = 200,
		};
		size_t before;
		pthread_t t;

		st.keep = talloc_new(NULL);
		st.kept = talloc_zero_array(st.keep, struct tmsg *, 400);
		st.kept_children = talloc_zero_array(st.keep, char *, 400);
		assert_non_null(st.kept);
		assert_non_null(st.kept_children);

		/* 200 from the owner thread, 200 from another */
		for (k = 0; k < 200; k++) {
			struct tmsg *m = tmsg_new_child(0, k);

			assert_non_null(m);
			m->mode = (enum tmsg_mode)(k % 4);
			assert_int_equal(
				evproxy_send(os.s, own_handler, &st, &m), 0);
			assert_null(m);
		}
		assert_int_equal(pthread_create(&t, NULL, own_thread, &os),
				 0);
		loop_until(ev, &st.done, LONG_MS);
		assert_int_equal(pthread_join(t, NULL), 0);
		assert_int_equal(st.delivered, 400);
		assert_int_equal(st.nkept, 100);
		assert_int_equal(st.nkept_children, 100);

		/*
		 * keep + its two arrays + kept messages with their children
		 * + kept children; nothing else ended up here.
		 */
		assert_int_equal(talloc_total_blocks(st.keep),
				 3 + 2 * st.nkept + st.nkept_children);
		for (k = 0; k < st.nkept; k++) {
			struct tmsg *m = st.kept[k];

			/* readable after the handler returned */
			assert_ptr_equal(talloc_parent(m), st.keep);
			assert_int_equal(m->magic, TMSG_MAGIC);
			assert_int_equal(m->mode, MODE_KEEP);
			assert_true(tmsg_child_ok(m));
		}
		for (k = 0; k < st.nkept_children; k++) {
			assert_ptr_equal(talloc_parent(st.kept_children[k]),
					 st.keep);
			assert_memory_equal(st.kept_children[k], "child ", 6);
		}
		talloc_free(st.keep);

		/*
		 * Messages the handler did not keep are freed: 64 dropped
		 * 1 MiB messages must not stay in the heap (skipped where
		 * mallinfo2 knows nothing, as under ASan; valgrind and ASan
		 * check the small ones above for leaks).
		 */
		before = heap_in_use();
		for (k = 0; k < 64; k++) {
			unsigned char *b = evproxy_msg_new(1 << 20, "big");
			bool done = false;

			assert_non_null(b);
			b[0] = 0xab;
			b[(1 << 20) - 1] = 0xcd;
			assert_int_equal(evproxy_send(os.s, big_drop_handler,
						      &done, &b), 0);
			loop_until(ev, &done, LONG_MS);
		}
		if (before != 0) {
			assert_true(heap_in_use() < before + (16 << 20));
		}
		evproxy_sender_unref(os.s);
		talloc_free(ev);
	}
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 4. Ownership errors */

static void never_handler(struct tevent_context *ev, void *msg,
			  void *private_data)
{
	TU_CHECK(false);
}

static void test_ownership_errors(void **state)
{
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct evproxy *p = proxy_new(ev, ev, 0, 0);
	struct evproxy_sender *s = evproxy_sender(p);
	TALLOC_CTX *parent = talloc_new(NULL);
	TALLOC_CTX *holder = talloc_new(NULL);
	struct evproxy_stats stats;
	struct tmsg *m, *orig;
	void *pool, *null_msg = NULL;

	tu_checks_reset();
	assert_non_null(parent);

	/* a message with a parent */
	m = orig = talloc_zero(parent, struct tmsg);
	assert_non_null(m);
	m->magic = TMSG_MAGIC;
	assert_int_equal(evproxy_send(s, never_handler, NULL, &m), EINVAL);
	assert_ptr_equal(m, orig);
	assert_ptr_equal(talloc_parent(m), parent);
	assert_int_equal(m->magic, TMSG_MAGIC);
	assert_int_equal(talloc_total_blocks(parent), 2);

	/* a member of a pool (its parent is the pool) */
	pool = talloc_pool(NULL, 1024);
	assert_non_null(pool);
	m = orig = talloc_zero(pool, struct tmsg);
	assert_non_null(m);
	assert_int_equal(evproxy_send(s, never_handler, NULL, &m), EINVAL);
	assert_ptr_equal(m, orig);
	assert_ptr_equal(talloc_parent(m), pool);
	talloc_free(pool);

	/* a top-level message with a talloc reference */
	m = orig = tmsg_new_child(0, 1);
	assert_non_null(m);
	assert_non_null(talloc_reference(holder, m));
	assert_int_equal(evproxy_send(s, never_handler, NULL, &m), EINVAL);
	assert_ptr_equal(m, orig);
	assert_null(talloc_parent(m));
	assert_int_equal(talloc_reference_count(m), 1);
	assert_true(tmsg_child_ok(m));
	assert_int_equal(talloc_unlink(holder, m), 0);
	assert_int_equal(talloc_reference_count(m), 0);
	/* now it conforms, and goes */
	assert_int_equal(evproxy_send(s, never_handler, NULL, &m), 0);
	assert_null(m);
	/* ... but is never delivered: the evproxy goes first (below) */

	/* NULL arguments */
	m = orig = tmsg_new_child(0, 2);
	assert_non_null(m);
	assert_int_equal(evproxy_send(s, never_handler, NULL, NULL), EINVAL);
	assert_int_equal(evproxy_send(s, never_handler, NULL, &null_msg),
			 EINVAL);
	assert_null(null_msg);
	assert_int_equal(evproxy_send(s, NULL, NULL, &m), EINVAL);
	assert_ptr_equal(m, orig);
	assert_int_equal(evproxy_send(NULL, never_handler, NULL, &m),
			 EINVAL);
	assert_ptr_equal(m, orig);
	assert_null(talloc_parent(m));
	assert_true(tmsg_child_ok(m));
	assert_int_equal(m->seq, 2);
	talloc_free(m);

	/* only the conforming message was queued */
	stats_get(p, &stats);
	assert_int_equal(stats.delivered, 0);
	talloc_free(p);		/* frees the queued message */
	assert_int_equal(talloc_total_blocks(parent), 2);
	talloc_free(parent);
	talloc_free(holder);
	evproxy_sender_unref(s);
	talloc_free(ev);
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* Null tracking on: evproxy_msg_new() and evproxy_send() refuse */

static void null_tracking_child(void)
{
	struct tevent_context *ev = tevent_context_init_byname(NULL, "epoll");
	struct evproxy *p = ev != NULL ? evproxy_create(ev, ev, NULL) : NULL;
	struct evproxy_sender *s = evproxy_sender(p);
	void *before = evproxy_msg_new(16, "before");
	void *before_orig = before;
	void *m, *tracked, *tracked_orig;
	int fails = 0;
	int ret;

	if (ev == NULL || p == NULL || s == NULL || before == NULL) {
		_exit(100);
	}
	talloc_enable_null_tracking();

	errno = 0;
	m = evproxy_msg_new(16, "during");
	if (m != NULL || errno != EINVAL) {
		fails |= 1;
	}

	tracked = tracked_orig = talloc_size(NULL, 16);
	ret = evproxy_send(s, never_handler, NULL, &tracked);
	if (ret != EINVAL || tracked != tracked_orig) {
		fails |= 2;
	}

	/*
	 * A message allocated before tracking was enabled is not linked into
	 * the null context (talloc does not reparent it), so moving it to
	 * another thread is safe and evproxy.h says it is accepted: the
	 * ownership moves (the queued message is freed with ev below).
	 */
	ret = evproxy_send(s, never_handler, NULL, &before);
	if (ret != 0 || before != NULL || before_orig == NULL) {
		fails |= 4;
	}

	talloc_disable_null_tracking();
	talloc_free(before);
	talloc_free(tracked);
	talloc_free(m);
	evproxy_sender_unref(s);
	talloc_free(ev);
	_exit(fails);
}

static void test_null_tracking(void **state)
{
	int status;
	pid_t pid;

	/* a child process: null tracking is global state */
	pid = fork();
	assert_true(pid != -1);
	if (pid == 0) {
		null_tracking_child();
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	if ((WEXITSTATUS(status) & 1) != 0) {
		fail_msg("evproxy_msg_new() allowed with null tracking on");
	}
	if ((WEXITSTATUS(status) & 2) != 0) {
		fail_msg("a message under the null context was accepted");
	}
	if ((WEXITSTATUS(status) & 4) != 0) {
		fail_msg("evproxy_send() refused an unlinked message "
			 "allocated before null tracking was enabled");
	}
	assert_int_equal(WEXITSTATUS(status), 0);
}

/* ------------------------------------------------------------------ */
/* 5. Destination gone */

struct count_state {
	uint64_t delivered;
	uint64_t target;
	bool done;
};

static void count_handler(struct tevent_context *ev, void *msg,
			  void *private_data)
{
	struct count_state *c = private_data;

	TU_CHECK(tmsg_get(msg) != NULL);
	c->delivered++;
	if (c->delivered >= c->target) {
		c->done = true;
	}
}

static void test_destination_gone(void **state)
{
	unsigned i, k;

	tu_checks_reset();
	for (i = 0; tu_all_backends[i] != NULL; i++) {
		unsigned free_ev;

		for (free_ev = 0; free_ev < 2; free_ev++) {
			struct tevent_context *ev =
				tu_context(NULL, tu_all_backends[i]);
			struct evproxy *p = proxy_new(ev, ev, 0, 0);
			struct evproxy_sender *s = evproxy_sender(p);
			struct evproxy_sender *s2 = evproxy_sender_ref(s);
			struct count_state c = { .target = 1 };
			struct tmsg *m, *orig;

			assert_ptr_equal(s2, s);
			/* one delivered, three queued when it goes */
			m = tmsg_new_child(0, 0);
			assert_int_equal(
				evproxy_send(s, count_handler, &c, &m), 0);
			loop_until(ev, &c.done, LONG_MS);
			for (k = 1; k < 4; k++) {
				m = tmsg_new_child(0, k);
				assert_int_equal(
					evproxy_send(s, count_handler, &c, &m),
					0);
			}
			if (free_ev) {
				talloc_free(ev);
			} else {
				talloc_free(p);
			}
			m = orig = tmsg_new_child(0, 9);
			assert_int_equal(evproxy_send(s, count_handler, &c,
						      &m), ECANCELED);
			assert_ptr_equal(m, orig);
			assert_null(talloc_parent(m));
			assert_int_equal(m->magic, TMSG_MAGIC);
			assert_true(tmsg_child_ok(m));
			talloc_free(m);
			assert_int_equal(c.delivered, 1);
			evproxy_sender_unref(s);
			/* still a valid handle until the last reference */
			m = orig = tmsg_new(0, 10);
			assert_int_equal(evproxy_send(s2, count_handler, &c,
						      &m), ECANCELED);
			assert_ptr_equal(m, orig);
			talloc_free(m);
			evproxy_sender_unref(s2);
			if (!free_ev) {
				talloc_free(ev);
			}
		}
	}
	tu_checks_assert();
}

/* Senders racing with the destruction of the destination. */

struct race_sender {
	pthread_t thread;
	struct evproxy_sender *s;
	struct count_state *c;	/* passed through only */
	uint32_t id;
	uint64_t sent_ok;
	uint64_t canceled;
	uint64_t eagain;
	uint64_t other;
};

static void *race_thread(void *arg)
{
	struct race_sender *rs = arg;
	uint64_t seq;

	for (seq = 0;; seq++) {
		struct tmsg *m = tmsg_new_child(rs->id, seq);
		struct tmsg *orig = m;
		int ret;

		TU_CHECK(m != NULL);
		if (m == NULL) {
			return NULL;
		}
		ret = evproxy_send(rs->s, count_handler, rs->c, &m);
		if (ret == 0) {
			TU_CHECK(m == NULL);
			rs->sent_ok++;
			continue;
		}
		/* still ours, untouched, valid memory */
		TU_CHECK(m == orig);
		TU_CHECK(m->magic == TMSG_MAGIC && m->seq == seq &&
		      m->producer == rs->id);
		TU_CHECK(tmsg_child_ok(m));
		TU_CHECK(talloc_parent(m) == NULL);
		talloc_free(m);
		if (ret == EAGAIN) {
			rs->eagain++;
			sched_yield();
			continue;
		}
		if (ret == ECANCELED) {
			rs->canceled++;
		} else {
			rs->other++;
		}
		return NULL;
	}
}

static void test_destination_race(void **state)
{
	const unsigned nsenders = 3;
	uint64_t rounds = tu_scale(200);
	uint64_t r, total_ok = 0, total_delivered = 0;
	uint64_t t0 = tu_now_ns();

	tu_checks_reset();
	for (r = 0; r < rounds; r++) {
		const char *spec = fifo_specs[r % 3];
		struct tevent_context *ev = tu_context(NULL, spec);
		struct evproxy *p = proxy_new(ev, ev, (r / 3) % 2 ? 16 : 0,
					      0);
		struct race_sender rs[3];
		struct count_state c = { .target = r % 20 };
		struct evproxy_stats stats;
		uint64_t ok = 0;
		unsigned k;

		memset(rs, 0, sizeof(rs));
		for (k = 0; k < nsenders; k++) {
			rs[k].s = evproxy_sender(p);
			rs[k].c = &c;
			rs[k].id = k;
			assert_int_equal(pthread_create(&rs[k].thread, NULL,
							race_thread, &rs[k]),
					 0);
		}
		if (c.target > 0) {
			loop_until(ev, &c.done, LONG_MS);
		}
		stats_get(p, &stats);
		assert_int_equal(stats.delivered, c.delivered);
		assert_int_equal(stats.discarded, 0);
		if (r % 2 == 0) {
			talloc_free(p);
		} else {
			talloc_free(ev);
			ev = NULL;
		}
		for (k = 0; k < nsenders; k++) {
			assert_int_equal(pthread_join(rs[k].thread, NULL), 0);
			/* each stops at its first ECANCELED */
			assert_int_equal(rs[k].canceled, 1);
			assert_int_equal(rs[k].other, 0);
			ok += rs[k].sent_ok;
			evproxy_sender_unref(rs[k].s);
		}
		/*
		 * sent_ok = delivered + discarded: the discarded ones are
		 * freed by the library (valgrind/ASan: no leak, no double
		 * free with the senders' own frees of ECANCELED messages).
		 */
		assert_true(ok >= c.delivered);
		total_ok += ok;
		total_delivered += c.delivered;
		talloc_free(ev);
	}
	print_message("    %llu rounds: %llu sent, %llu delivered, "
		      "%llu discarded, %.0f ms\n", (unsigned long long)rounds,
		      (unsigned long long)total_ok,
		      (unsigned long long)total_delivered,
		      (unsigned long long)(total_ok - total_delivered),
		      (tu_now_ns() - t0) / 1e6);
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 6. Backpressure: a destination thread driven by commands */

enum dcmd {
	DCMD_NONE = 0,
	DCMD_RUN,		/* loop until 'target' deliveries */
	DCMD_FREE_PROXY,
	DCMD_EXIT,
};

struct dthread {
	pthread_t thread;
	const char *spec;
	size_t capacity;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool ready;
	enum dcmd cmd;
	uint64_t target;
	struct evproxy_sender *s;	/* published when ready */
	atomic_uint_fast64_t delivered;
	uint64_t last_seq;		/* destination thread */
	bool any;			/* destination thread */
	uint64_t inversions;		/* destination thread */
	uint64_t seq;			/* main thread: next to send */
};

static void dthread_handler(struct tevent_context *ev, void *msg,
			    void *private_data)
{
	struct dthread *d = private_data;
	struct tmsg *m = tmsg_get(msg);

	if (m != NULL) {
		TU_CHECK(tmsg_child_ok(m));
		/* strictly increasing (messages given up leave gaps) */
		if (d->any && m->seq <= d->last_seq) {
			d->inversions++;
		}
		d->last_seq = m->seq;
		d->any = true;
	}
	atomic_fetch_add(&d->delivered, 1);
}

static void *dthread_main(void *arg)
{
	struct dthread *d = arg;
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context_try(mem, d->spec);
	struct evproxy_config cfg;
	struct evproxy *p = NULL;

	evproxy_config_default(&cfg);
	cfg.capacity = d->capacity;
	if (ev != NULL) {
		p = evproxy_create(mem, ev, &cfg);
	}
	TU_CHECK(p != NULL);
	pthread_mutex_lock(&d->lock);
	d->s = evproxy_sender(p);
	d->ready = true;
	pthread_cond_broadcast(&d->cond);
	pthread_mutex_unlock(&d->lock);

	for (;;) {
		enum dcmd cmd;
		uint64_t target;

		pthread_mutex_lock(&d->lock);
		while (d->cmd == DCMD_NONE) {
			pthread_cond_wait(&d->cond, &d->lock);
		}
		cmd = d->cmd;
		target = d->target;
		pthread_mutex_unlock(&d->lock);
		if (cmd == DCMD_EXIT) {
			break;
		}
		if (cmd == DCMD_RUN && p != NULL) {
			uint64_t deadline = tu_now_ns() + LONG_MS * 1000000ULL;
			TALLOC_CTX *ticker = ticker_start(ev);

			while (atomic_load(&d->delivered) < target) {
				if (tevent_loop_once(ev) != 0 ||
				    tu_now_ns() > deadline) {
					TU_CHECK(false);
					break;
				}
			}
			talloc_free(ticker);
		}
		if (cmd == DCMD_FREE_PROXY) {
			TALLOC_FREE(p);
		}
		pthread_mutex_lock(&d->lock);
		d->cmd = DCMD_NONE;
		pthread_cond_broadcast(&d->cond);
		pthread_mutex_unlock(&d->lock);
	}
	talloc_free(mem);
	return NULL;
}

static void dthread_start(struct dthread *d, const char *spec,
			  size_t capacity)
{
	memset(d, 0, sizeof(*d));
	d->spec = spec;
	d->capacity = capacity;
	pthread_mutex_init(&d->lock, NULL);
	pthread_cond_init(&d->cond, NULL);
	atomic_init(&d->delivered, 0);
	assert_int_equal(pthread_create(&d->thread, NULL, dthread_main, d),
			 0);
	pthread_mutex_lock(&d->lock);
	while (!d->ready) {
		pthread_cond_wait(&d->cond, &d->lock);
	}
	pthread_mutex_unlock(&d->lock);
	assert_non_null(d->s);
}

static void dthread_post(struct dthread *d, enum dcmd cmd, uint64_t target)
{
	pthread_mutex_lock(&d->lock);
	while (d->cmd != DCMD_NONE) {
		pthread_cond_wait(&d->cond, &d->lock);
	}
	d->cmd = cmd;
	d->target = target;
	pthread_cond_broadcast(&d->cond);
	pthread_mutex_unlock(&d->lock);
}

static void dthread_wait(struct dthread *d)
{
	pthread_mutex_lock(&d->lock);
	while (d->cmd != DCMD_NONE) {
		pthread_cond_wait(&d->cond, &d->lock);
	}
	pthread_mutex_unlock(&d->lock);
}

static void dthread_stop(struct dthread *d)
{
	dthread_post(d, DCMD_EXIT, 0);
	assert_int_equal(pthread_join(d->thread, NULL), 0);
	evproxy_sender_unref(d->s);
	pthread_mutex_destroy(&d->lock);
	pthread_cond_destroy(&d->cond);
}

/* Fill the (idle) destination's queue until EAGAIN; returns the count. */
static unsigned dthread_fill(struct dthread *d)
{
	unsigned n = 0;

	for (;;) {
		struct tmsg *m = tmsg_new_child(0, d->seq);
		struct tmsg *orig = m;
		int ret;

		assert_non_null(m);
		ret = evproxy_send(d->s, dthread_handler, d, &m);
		if (ret == EAGAIN) {
			assert_ptr_equal(m, orig);
			assert_true(tmsg_child_ok(m));
			talloc_free(m);
			return n;
		}
		assert_int_equal(ret, 0);
		assert_null(m);
		d->seq++;
		n++;
	}
}

struct ss_state {
	struct dthread *d;
	int ret;
	bool done;
	uint64_t delivered_at_done;
};

static void ss_done(struct tevent_req *req)
{
	struct ss_state *st = tevent_req_callback_data_void(req);

	st->ret = evproxy_send_recv(req);
	st->delivered_at_done = st->d != NULL ?
				atomic_load(&st->d->delivered) : 0;
	st->done = true;
	talloc_free(req);
}

static struct tevent_req *ss_start(struct tevent_context *ev,
				   struct dthread *d, struct ss_state *st,
				   void *pmsg)
{
	struct tevent_req *req;

	memset(st, 0, sizeof(*st));
	st->d = d;
	st->ret = -1;
	req = evproxy_send_send(ev, ev, d->s, dthread_handler, d, pmsg);
	assert_non_null(req);
	tevent_req_set_callback(req, ss_done, st);
	return req;
}

static void backpressure_basic(const char *dest_spec, const char *src_spec)
{
	struct tevent_context *ev = tu_context(NULL, src_spec);
	struct dthread d;
	struct ss_state st, st2;
	struct tmsg *m, *m2, *orig;
	struct tevent_req *req;
	uint64_t inversions;

	dthread_start(&d, dest_spec, 4);

	/* full at exactly the capacity */
	assert_int_equal(dthread_fill(&d), 4);

	/* a waiting send completes only after the destination drains */
	m = orig = tmsg_new_child(0, d.seq++);
	m2 = tmsg_new_child(0, d.seq++);
	req = ss_start(ev, &d, &st, &m);
	ss_start(ev, &d, &st2, &m2);
	assert_true(tevent_req_is_in_progress(req));
	loop_for(ev, 20);
	assert_false(st.done);
	assert_false(st2.done);
	assert_ptr_equal(m, orig);
	assert_int_equal(atomic_load(&d.delivered), 0);

	dthread_post(&d, DCMD_RUN, 6);
	loop_until(ev, &st.done, LONG_MS);
	loop_until(ev, &st2.done, LONG_MS);
	assert_int_equal(st.ret, 0);
	assert_int_equal(st2.ret, 0);
	assert_null(m);
	assert_null(m2);
	assert_true(st.delivered_at_done >= 1);
	assert_true(st2.delivered_at_done >= 1);
	dthread_wait(&d);
	assert_int_equal(atomic_load(&d.delivered), 6);
	/* two waiting requests of one thread: no order promised */
	inversions = d.inversions;
	if (inversions != 0) {
		print_message("    note (%s -> %s): the two waiting requests "
			      "were queued in reverse order\n", src_spec,
			      dest_spec);
	}

	/* space available: done at once (posted), message taken */
	m = tmsg_new_child(0, d.seq++);
	ss_start(ev, &d, &st, &m);
	assert_null(m);
	assert_false(st.done);
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, 0);
	dthread_post(&d, DCMD_RUN, 7);
	dthread_wait(&d);

	/* freeing the request while it waits leaves the message with us */
	assert_int_equal(dthread_fill(&d), 4);
	m = orig = tmsg_new_child(0, d.seq++);
	req = ss_start(ev, &d, &st, &m);
	loop_for(ev, 5);
	assert_false(st.done);
	talloc_free(req);
	assert_ptr_equal(m, orig);
	dthread_post(&d, DCMD_RUN, 11);
	dthread_wait(&d);
	loop_for(ev, 5);
	assert_false(st.done);
	assert_ptr_equal(m, orig);
	assert_true(tmsg_child_ok(m));
	assert_null(talloc_parent(m));
	talloc_free(m);
	assert_int_equal(atomic_load(&d.delivered), 11);

	/* the destination goes while a send waits: ECANCELED, ours */
	assert_int_equal(dthread_fill(&d), 4);
	m = orig = tmsg_new_child(0, d.seq++);
	ss_start(ev, &d, &st, &m);
	loop_for(ev, 5);
	assert_false(st.done);
	dthread_post(&d, DCMD_FREE_PROXY, 0);
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, ECANCELED);
	assert_ptr_equal(m, orig);
	assert_true(tmsg_child_ok(m));
	assert_null(talloc_parent(m));

	/* and a new send to it fails the same way */
	ss_start(ev, &d, &st, &m);
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, ECANCELED);
	assert_ptr_equal(m, orig);
	talloc_free(m);

	dthread_stop(&d);
	assert_int_equal(atomic_load(&d.delivered), 11);
	assert_int_equal(d.inversions, inversions);
	talloc_free(ev);
}

/* A bounded queue holds exactly its capacity, lap after lap. */
static void test_bounded_capacity(void **state)
{
	const size_t caps[] = { 1, 2, 3, 4, 5, 8, 100 };
	unsigned i, lap;

	tu_checks_reset();
	for (i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		struct tevent_context *ev = tu_context(NULL, "epoll");
		struct evproxy *p = proxy_new(ev, ev, caps[i], 0);
		struct evproxy_sender *s = evproxy_sender(p);
		struct fifo_dest d = {
			.nproducers = 1,
			.next = talloc_zero_array(ev, uint64_t, 1),
		};
		uint64_t seq = 0;

		for (lap = 0; lap < 3; lap++) {
			size_t n = 0;

			for (;;) {
				struct tmsg *m = tmsg_new(0, seq);
				struct tmsg *orig = m;
				int ret = evproxy_send(s, fifo_handler, &d,
						       &m);

				if (ret == EAGAIN) {
					assert_ptr_equal(m, orig);
					talloc_free(m);
					break;
				}
				assert_int_equal(ret, 0);
				seq++;
				if (++n > caps[i]) {
					break;
				}
			}
			if (n != caps[i]) {
				fail_msg("capacity %zu: %zu sends succeeded "
					 "on a full queue", caps[i], n);
			}
			d.expected += n;
			d.done = false;
			loop_until(ev, &d.done, LONG_MS);
			assert_int_equal(d.delivered, seq);
			assert_int_equal(d.next[0], seq);
		}
		evproxy_sender_unref(s);
		talloc_free(ev);
	}
	tu_checks_assert();
}

static void test_backpressure(void **state)
{
	tu_checks_reset();
	backpressure_basic("epoll", "epoll");
	backpressure_basic("evpoll-always", "epoll");
	backpressure_basic("epoll", "evpoll-auto");
	tu_checks_assert();
}

static void test_backpressure_args(void **state)
{
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct dthread d;
	struct ss_state st;
	struct tevent_req *req;
	struct tmsg *m, *orig;
	TALLOC_CTX *parent = talloc_new(NULL);
	void *null_msg = NULL;

	tu_checks_reset();
	dthread_start(&d, "epoll", 4);
	m = orig = tmsg_new_child(0, 0);

	/* no loop to post on: NULL at once */
	errno = 0;
	req = evproxy_send_send(ev, NULL, d.s, dthread_handler, &d, &m);
	assert_null(req);
	assert_int_equal(errno, EINVAL);
	assert_ptr_equal(m, orig);

	/* the others fail through the request */
	req = evproxy_send_send(ev, ev, NULL, dthread_handler, &d, &m);
	assert_non_null(req);
	tevent_req_set_callback(req, ss_done, &st);
	memset(&st, 0, sizeof(st));
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, EINVAL);
	assert_ptr_equal(m, orig);

	req = evproxy_send_send(ev, ev, d.s, NULL, &d, &m);
	assert_non_null(req);
	tevent_req_set_callback(req, ss_done, &st);
	memset(&st, 0, sizeof(st));
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, EINVAL);
	assert_ptr_equal(m, orig);

	req = evproxy_send_send(ev, ev, d.s, dthread_handler, &d, NULL);
	assert_non_null(req);
	tevent_req_set_callback(req, ss_done, &st);
	memset(&st, 0, sizeof(st));
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, EINVAL);

	ss_start(ev, &d, &st, &null_msg);
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, EINVAL);
	assert_null(null_msg);

	/* a message with a parent */
	talloc_steal(parent, m);
	ss_start(ev, &d, &st, &m);
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, EINVAL);
	assert_ptr_equal(m, orig);
	assert_ptr_equal(talloc_parent(m), parent);

	/* the same while the queue is full: still EINVAL, not a wait */
	assert_int_equal(dthread_fill(&d), 4);
	ss_start(ev, &d, &st, &m);
	loop_until(ev, &st.done, LONG_MS);
	assert_int_equal(st.ret, EINVAL);
	assert_ptr_equal(talloc_parent(m), parent);

	assert_int_equal(evproxy_send_recv(NULL), EINVAL);
	talloc_free(parent);
	dthread_stop(&d);
	assert_int_equal(atomic_load(&d.delivered), 0);
	talloc_free(ev);
	tu_checks_assert();
}

/* Many sends with backpressure, each waiting in turn, FIFO. */

struct chain {
	struct tevent_context *ev;
	struct dthread *d;
	struct tmsg *m;		/* pending message, NULL once queued */
	uint64_t sent;
	uint64_t total;
	bool done;
};

static void chain_next(struct chain *c);

static void chain_done(struct tevent_req *req)
{
	struct chain *c = tevent_req_callback_data_void(req);
	int ret = evproxy_send_recv(req);

	talloc_free(req);
	TU_CHECK(ret == 0);
	TU_CHECK(c->m == NULL);
	if (ret != 0) {
		talloc_free(c->m);
		c->m = NULL;
		c->done = true;
		return;
	}
	c->sent++;
	chain_next(c);
}

static void chain_next(struct chain *c)
{
	struct tevent_req *req;

	if (c->sent == c->total) {
		c->done = true;
		return;
	}
	c->m = tmsg_new_child(0, c->d->seq++);
	TU_CHECK(c->m != NULL);
	req = evproxy_send_send(c->ev, c->ev, c->d->s, dthread_handler, c->d,
				&c->m);
	TU_CHECK(req != NULL);
	if (req == NULL) {
		talloc_free(c->m);
		c->done = true;
		return;
	}
	tevent_req_set_callback(req, chain_done, c);
}

static void test_backpressure_chain(void **state)
{
	const char *specs[][2] = {
		{ "epoll", "epoll" },
		{ "evpoll-auto", "evpoll-auto" },
		{ "evpoll-always", "epoll" },
		{ "epoll", "epoll" },
		{ "evpoll-always", "evpoll-auto" },
	};
	unsigned i;

	tu_checks_reset();
	for (i = 0; i < 5; i++) {
		bool spin = strcmp(specs[i][1], "epoll") != 0;
		struct chain c = {
			.ev = tu_context(NULL, specs[i][1]),
			/*
			 * two spinning loops on two cores: fewer; not scaled
			 * down otherwise, the waiter races need the count
			 */
			.total = spin ? tu_scale(2000) : 20000,
		};
		struct dthread d;
		uint64_t t0 = tu_now_ns();

		/* the last two: a waiter at almost every send */
		dthread_start(&d, specs[i][0], i < 3 ? 4 : 2);
		c.d = &d;
		dthread_post(&d, DCMD_RUN, c.total);
		chain_next(&c);
		loop_until(c.ev, &c.done, LONG_MS);
		dthread_wait(&d);
		assert_int_equal(c.sent, c.total);
		assert_int_equal(atomic_load(&d.delivered), c.total);
		dthread_stop(&d);
		assert_int_equal(d.inversions, 0);
		print_message("    %s -> %s, capacity %d: %llu sends, "
			      "%.0f ms\n", specs[i][1], specs[i][0],
			      i < 3 ? 4 : 2, (unsigned long long)c.total,
			      (tu_now_ns() - t0) / 1e6);
		talloc_free(c.ev);
	}
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 7. Batch yield */

struct yield_state {
	uint64_t delivered;
	uint64_t total;
	uint64_t busy_until;
	int pipe_w;
	bool timer_ran;
	bool fd_ran;
	uint64_t timer_at;
	uint64_t fd_at;
	struct tevent_fd *fde;
	bool done;
};

static void busy_ns(uint64_t ns)
{
	uint64_t end = tu_now_ns() + ns;

	while (tu_now_ns() < end) {
		/* busy */
	}
}

static void yield_update(struct yield_state *y)
{
	y->done = y->delivered == y->total && y->timer_ran && y->fd_ran;
}

static void yield_handler(struct tevent_context *ev, void *msg,
			  void *private_data)
{
	struct yield_state *y = private_data;

	TU_CHECK(tmsg_get(msg) != NULL);
	if (y->delivered == 0) {
		/* the fd becomes readable and the timer due during a batch */
		TU_CHECK(write(y->pipe_w, "x", 1) == 1);
		while (tu_now_ns() < y->busy_until) {
			/* busy */
		}
	}
	/*
	 * Each message costs about 2 us, so that an evpoll loop's periodic
	 * check of fds and timers (every 20 us) comes due during the flood.
	 */
	busy_ns(2000);
	y->delivered++;
	yield_update(y);
}

static void yield_timer(struct tevent_context *ev, struct tevent_timer *te,
			struct timeval now, void *private_data)
{
	struct yield_state *y = private_data;

	y->timer_ran = true;
	y->timer_at = y->delivered;
	yield_update(y);
}

static void yield_fd(struct tevent_context *ev, struct tevent_fd *fde,
		     uint16_t flags, void *private_data)
{
	struct yield_state *y = private_data;

	y->fd_ran = true;
	y->fd_at = y->delivered;
	TALLOC_FREE(y->fde);
	yield_update(y);
}

struct flood {
	struct evproxy_sender *s;
	evproxy_msg_handler_t handler;
	void *private_data;
	uint64_t count;
};

static void *flood_thread(void *arg)
{
	struct flood *f = arg;
	uint64_t i;

	for (i = 0; i < f->count; i++) {
		struct tmsg *m = tmsg_new(0, i);

		TU_CHECK(evproxy_send(f->s, f->handler, f->private_data, &m) ==
		      0);
		if (m != NULL) {
			talloc_free(m);
		}
	}
	return NULL;
}

/* Send @count messages from another thread and wait until it is done. */
static void flood_join(struct evproxy_sender *s, evproxy_msg_handler_t fn,
		       void *private_data, uint64_t count)
{
	struct flood f = {
		.s = s, .handler = fn, .private_data = private_data,
		.count = count,
	};
	pthread_t t;

	assert_int_equal(pthread_create(&t, NULL, flood_thread, &f), 0);
	assert_int_equal(pthread_join(t, NULL), 0);
}

static void test_batch_yield(void **state)
{
	const char *specs[] = { "epoll", "evpoll-always", NULL };
	unsigned i;

	tu_checks_reset();
	for (i = 0; specs[i] != NULL; i++) {
		struct tevent_context *ev = tu_context(NULL, specs[i]);
		struct evproxy *p = proxy_new(ev, ev, 0, 4);
		struct evproxy_sender *s = evproxy_sender(p);
		struct yield_state y = { .total = 1000 };
		struct evproxy_stats stats;
		int fds[2];

		assert_int_equal(pipe(fds), 0);
		y.pipe_w = fds[1];
		flood_join(s, yield_handler, &y, y.total);
		y.fde = tevent_add_fd(ev, ev, fds[0], TEVENT_FD_READ,
				      yield_fd, &y);
		assert_non_null(y.fde);
		assert_non_null(tevent_add_timer(
			ev, ev, tevent_timeval_current_ofs(0, 1000),
			yield_timer, &y));
		y.busy_until = tu_now_ns() + 3000000;
		loop_until(ev, &y.done, LONG_MS);
		print_message("    %s: timer ran after %llu, fd after %llu "
			      "of %llu\n", specs[i],
			      (unsigned long long)y.timer_at,
			      (unsigned long long)y.fd_at,
			      (unsigned long long)y.total);
		assert_true(y.timer_at < y.total);
		assert_true(y.fd_at < y.total);
		stats_get(p, &stats);
		assert_int_equal(stats.delivered, y.total);
		assert_true(stats.batches >= y.total / 4);
		close(fds[0]);
		close(fds[1]);
		evproxy_sender_unref(s);
		talloc_free(ev);
	}
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 8. Kernel wake-ups */

struct wake_state {
	struct count_state c;
	struct evproxy_sender *s;
	uint64_t count;
};

static void *wake_thread(void *arg)
{
	struct wake_state *w = arg;
	struct flood f = {
		.s = w->s, .handler = count_handler, .private_data = &w->c,
		.count = w->count,
	};

	return flood_thread(&f);
}

static void test_kernel_wakeups(void **state)
{
	uint64_t n = tu_scale(100000);
	struct tevent_context *ev;
	struct evproxy *p;
	struct evproxy_stats stats;
	struct wake_state w;
	pthread_t t;
	unsigned batch;

	tu_checks_reset();

	/* a spinning destination: no eventfd write per message */
	ev = tu_context(NULL, "evpoll-always");
	p = proxy_new(ev, ev, 0, 0);
	memset(&w, 0, sizeof(w));
	w.s = evproxy_sender(p);
	w.count = n;
	w.c.target = n;
	assert_int_equal(pthread_create(&t, NULL, wake_thread, &w), 0);
	loop_until(ev, &w.c.done, LONG_MS);
	assert_int_equal(pthread_join(t, NULL), 0);
	stats_get(p, &stats);
	print_message("    evpoll-always: %llu messages, %llu kernel "
		      "wake-ups, %llu batches\n", (unsigned long long)n,
		      (unsigned long long)stats.kernel_wakeups,
		      (unsigned long long)stats.batches);
	assert_int_equal(stats.delivered, n);
	assert_true(stats.kernel_wakeups <= 10);
	evproxy_sender_unref(w.s);
	talloc_free(ev);

	/*
	 * A stock epoll destination, busy while the messages come (they
	 * are all sent before its loop runs): one wake-up in all, as long
	 * as one batch takes them all; otherwise one per batch (the
	 * consumer rings itself to yield).
	 */
	for (batch = 0; batch < 2; batch++) {
		uint64_t cnt = batch == 0 ? 100 : n;

		ev = tu_context(NULL, "epoll");
		p = proxy_new(ev, ev, 0, batch == 0 ? 0 : (unsigned)n + 1);
		memset(&w, 0, sizeof(w));
		w.s = evproxy_sender(p);
		w.c.target = cnt;
		flood_join(w.s, count_handler, &w.c, cnt);
		loop_until(ev, &w.c.done, LONG_MS);
		stats_get(p, &stats);
		assert_int_equal(stats.delivered, cnt);
		assert_int_equal(stats.kernel_wakeups, 1);
		assert_int_equal(stats.batches, 1);

		/* the next message after it went idle wakes it once more */
		flood_join(w.s, count_handler, &w.c, 1);
		w.c.target++;
		w.c.done = false;
		loop_until(ev, &w.c.done, LONG_MS);
		stats_get(p, &stats);
		assert_int_equal(stats.kernel_wakeups, 2);
		evproxy_sender_unref(w.s);
		talloc_free(ev);
	}

	/* default batch, 1000 queued: one wake-up plus one per yield */
	ev = tu_context(NULL, "epoll");
	p = proxy_new(ev, ev, 0, 0);
	memset(&w, 0, sizeof(w));
	w.s = evproxy_sender(p);
	w.c.target = 1000;
	flood_join(w.s, count_handler, &w.c, 1000);
	loop_until(ev, &w.c.done, LONG_MS);
	stats_get(p, &stats);
	print_message("    epoll, batch 128: 1000 queued messages, %llu "
		      "kernel wake-ups, %llu batches\n",
		      (unsigned long long)stats.kernel_wakeups,
		      (unsigned long long)stats.batches);
	assert_true(stats.kernel_wakeups <= 1 + 1000 / 128 + 1);
	evproxy_sender_unref(w.s);
	talloc_free(ev);
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 9. Request/reply between two loops */

struct rr_server {
	pthread_t thread;
	const char *spec;
	struct evproxy_sender *reply_to;	/* the client's, ours */
	void *client;				/* passed through */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool ready;
	struct evproxy_sender *s;		/* published when ready */
	bool stop;				/* server thread */
	uint64_t served;			/* server thread */
};

struct rr_client {
	struct evproxy_sender *server;
	struct rr_server *srv;
	uint64_t next_reply;
	uint64_t sent;
	uint64_t total;
	bool done;
};

static void rr_reply(struct tevent_context *ev, void *msg,
		     void *private_data);

static void rr_serve(struct tevent_context *ev, void *msg,
		     void *private_data)
{
	struct rr_server *srv = private_data;
	struct tmsg *m = tmsg_get(msg);
	int ret;

	if (m == NULL) {
		return;
	}
	if (m->mode == MODE_STOP) {
		srv->stop = true;
		return;
	}
	TU_CHECK(m->mode == MODE_REQUEST);
	TU_CHECK(m->seq == srv->served);
	srv->served++;
	/* answer with the request itself: make it top-level again */
	m->mode = MODE_REPLY;
	talloc_steal(NULL, m);
	ret = evproxy_send(srv->reply_to, rr_reply, srv->client, &m);
	TU_CHECK(ret == 0);
	if (ret != 0) {
		talloc_free(m);
	}
}

static void rr_send_request(struct rr_client *c)
{
	struct tmsg *m = tmsg_new_child(0, c->sent);

	TU_CHECK(m != NULL);
	if (m == NULL) {
		return;
	}
	m->mode = MODE_REQUEST;
	TU_CHECK(evproxy_send(c->server, rr_serve, c->srv, &m) == 0);
	TU_CHECK(m == NULL);
	c->sent++;
}

static void rr_reply(struct tevent_context *ev, void *msg,
		     void *private_data)
{
	struct rr_client *c = private_data;
	struct tmsg *m = tmsg_get(msg);

	if (m == NULL) {
		return;
	}
	TU_CHECK(m->mode == MODE_REPLY);
	TU_CHECK(tmsg_child_ok(m));
	/* all replies in order */
	TU_CHECK(m->seq == c->next_reply);
	c->next_reply = m->seq + 1;
	if (c->sent < c->total) {
		rr_send_request(c);
	}
	if (c->next_reply == c->total) {
		c->done = true;
	}
}

static void *rr_server_main(void *arg)
{
	struct rr_server *srv = arg;
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context_try(mem, srv->spec);
	struct evproxy *p = ev != NULL ?
			    evproxy_create(ev, ev, NULL) : NULL;

	TU_CHECK(p != NULL);
	pthread_mutex_lock(&srv->lock);
	srv->s = evproxy_sender(p);
	srv->ready = true;
	pthread_cond_broadcast(&srv->cond);
	pthread_mutex_unlock(&srv->lock);
	if (p != NULL) {
		TU_CHECK(thread_loop_until(ev, &srv->stop, LONG_MS));
	}
	talloc_free(mem);
	evproxy_sender_unref(srv->reply_to);
	return NULL;
}

static void run_request_reply(const char *spec, unsigned window,
			      uint64_t total)
{
	struct tevent_context *ev = tu_context(NULL, spec);
	struct evproxy *p = proxy_new(ev, ev, 0, 0);
	struct rr_server srv = { .spec = spec };
	struct rr_client c = { .total = total, .srv = &srv };
	struct tmsg *stop;
	uint64_t t0 = tu_now_ns();
	unsigned i;

	pthread_mutex_init(&srv.lock, NULL);
	pthread_cond_init(&srv.cond, NULL);
	srv.reply_to = evproxy_sender(p);
	srv.client = &c;
	assert_int_equal(pthread_create(&srv.thread, NULL, rr_server_main,
					&srv), 0);
	pthread_mutex_lock(&srv.lock);
	while (!srv.ready) {
		pthread_cond_wait(&srv.cond, &srv.lock);
	}
	pthread_mutex_unlock(&srv.lock);
	assert_non_null(srv.s);
	c.server = srv.s;

	for (i = 0; i < window && c.sent < total; i++) {
		rr_send_request(&c);
	}
	loop_until(ev, &c.done, LONG_MS);
	stop = tmsg_new(0, 0);
	stop->mode = MODE_STOP;
	assert_int_equal(evproxy_send(c.server, rr_serve, &srv, &stop), 0);
	assert_int_equal(pthread_join(srv.thread, NULL), 0);
	assert_int_equal(c.next_reply, total);
	assert_int_equal(srv.served, total);
	{
		struct evproxy_stats ps;

		stats_get(p, &ps);
		print_message("    %s window %u: %llu round trips, %.0f ms, "
			      "client: %llu kernel wake-ups, %llu batches\n",
			      spec, window, (unsigned long long)total,
			      (tu_now_ns() - t0) / 1e6,
			      (unsigned long long)ps.kernel_wakeups,
			      (unsigned long long)ps.batches);
	}
	evproxy_sender_unref(c.server);
	pthread_mutex_destroy(&srv.lock);
	pthread_cond_destroy(&srv.cond);
	talloc_free(ev);
}

static void test_request_reply(void **state)
{
	tu_checks_reset();
	run_request_reply("epoll", 1, tu_scale(10000));
	/*
	 * Two spinning loops on a loaded 2-core machine take turns with
	 * spin timeouts: fewer round trips here.
	 */
	run_request_reply("evpoll-auto", 1, tu_scale(1000));
	run_request_reply("epoll", 64, tu_scale(10000));
	run_request_reply("evpoll-always", 64, tu_scale(2000));
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 10. The tevent_thread_proxy drop-in */

struct tp_ops {
	const char *name;
	bool fifo;		/* evproxy's: FIFO per sender */
	void *(*create)(struct tevent_context *dest_ev);
	void (*schedule)(void *tp, struct tevent_immediate **pp_im,
			 tevent_immediate_handler_t handler,
			 void *pp_private_data);
};

static void *evproxy_tp_create(struct tevent_context *dest_ev)
{
	return evproxy_thread_proxy_create(dest_ev);
}

static void evproxy_tp_schedule(void *tp, struct tevent_immediate **pp_im,
				tevent_immediate_handler_t handler,
				void *pp_private_data)
{
	evproxy_thread_proxy_schedule(tp, pp_im, handler, pp_private_data);
}

static void *tevent_tp_create(struct tevent_context *dest_ev)
{
	return tevent_thread_proxy_create(dest_ev);
}

static void tevent_tp_schedule(void *tp, struct tevent_immediate **pp_im,
			       tevent_immediate_handler_t handler,
			       void *pp_private_data)
{
	tevent_thread_proxy_schedule(tp, pp_im, handler, pp_private_data);
}

static const struct tp_ops evproxy_tp_ops = {
	"evproxy_thread_proxy", true, evproxy_tp_create, evproxy_tp_schedule,
};

static const struct tp_ops tevent_tp_ops = {
	"tevent_thread_proxy", false, tevent_tp_create, tevent_tp_schedule,
};

struct tp_dest {
	const struct tp_ops *ops;
	unsigned nproducers;
	uint64_t *next;
	uint64_t *count;	/* per producer */
	uint64_t *seq_sum;	/* per producer: no duplicate, no gap */
	uint64_t out_of_order;
	uint64_t delivered;
	uint64_t expected;
	TALLOC_CTX *keep;
	uint64_t kept;
	bool done;
};

static void tp_handler(struct tevent_context *ev, struct tevent_immediate *im,
		       void *private_data)
{
	struct tmsg *m = tmsg_get(private_data);
	struct tp_dest *d;

	TU_CHECK(im != NULL);
	if (m == NULL) {
		return;
	}
	d = m->dest;
	TU_CHECK(tmsg_child_ok(m));
	d->delivered++;
	d->done = d->delivered >= d->expected;
	TU_CHECK(m->producer < d->nproducers);
	if (m->producer >= d->nproducers) {
		return;
	}
	if (m->seq != d->next[m->producer]) {
		d->out_of_order++;
	}
	d->next[m->producer] = m->seq + 1;
	d->count[m->producer]++;
	d->seq_sum[m->producer] += m->seq;
	if (m->seq % 97 == 0) {
		talloc_steal(d->keep, m);
		d->kept++;
	}
}

struct tp_producer {
	pthread_t thread;
	const struct tp_ops *ops;
	void *tp;
	struct tp_dest *d;
	uint32_t id;
	uint64_t count;
};

static void *tp_producer_main(void *arg)
{
	struct tp_producer *pr = arg;
	TALLOC_CTX *local = talloc_new(NULL);
	uint64_t seq;

	TU_CHECK(local != NULL);
	for (seq = 0; seq < pr->count; seq++) {
		/* from the thread's own tree and from the NULL context */
		TALLOC_CTX *parent = seq % 2 == 0 ? local : NULL;
		struct tevent_immediate *im = tevent_create_immediate(parent);
		struct tmsg *m = talloc_zero(parent, struct tmsg);

		TU_CHECK(im != NULL && m != NULL);
		m->magic = TMSG_MAGIC;
		m->producer = pr->id;
		m->seq = seq;
		m->dest = pr->d;
		m->child = talloc_asprintf(m, "child %u/%llu",
					   (unsigned)pr->id,
					   (unsigned long long)seq);
		pr->ops->schedule(pr->tp, &im, tp_handler, &m);
		TU_CHECK(im == NULL);
		TU_CHECK(m == NULL);
	}
	/* both moved out of the thread's tree */
	TU_CHECK(talloc_total_blocks(local) == 1);
	talloc_free(local);
	return NULL;
}

static void run_thread_proxy(const struct tp_ops *ops, const char *spec,
			     unsigned nproducers, uint64_t count)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, spec);
	void *tp = ops->create(ev);
	struct tp_producer *pr = talloc_zero_array(mem, struct tp_producer,
						   nproducers);
	struct tp_dest d = {
		.ops = ops,
		.nproducers = nproducers,
		.next = talloc_zero_array(mem, uint64_t, nproducers),
		.count = talloc_zero_array(mem, uint64_t, nproducers),
		.seq_sum = talloc_zero_array(mem, uint64_t, nproducers),
		.expected = nproducers * count,
		.keep = talloc_new(mem),
	};
	uint64_t t0 = tu_now_ns();
	unsigned i;

	assert_non_null(tp);
	assert_non_null(d.next);
	for (i = 0; i < nproducers; i++) {
		pr[i].ops = ops;
		pr[i].tp = tp;
		pr[i].d = &d;
		pr[i].id = i;
		pr[i].count = count;
		assert_int_equal(pthread_create(&pr[i].thread, NULL,
						tp_producer_main, &pr[i]), 0);
	}
	loop_until(ev, &d.done, LONG_MS);
	for (i = 0; i < nproducers; i++) {
		assert_int_equal(pthread_join(pr[i].thread, NULL), 0);
	}
	loop_for(ev, 2);
	print_message("    %s on %s: %u x %llu, %.0f ms, %llu out of "
		      "order\n", ops->name, spec, nproducers,
		      (unsigned long long)count, (tu_now_ns() - t0) / 1e6,
		      (unsigned long long)d.out_of_order);
	assert_int_equal(d.delivered, nproducers * count);
	for (i = 0; i < nproducers; i++) {
		assert_int_equal(d.count[i], count);
		assert_int_equal(d.seq_sum[i], count * (count - 1) / 2);
	}
	if (ops->fifo) {
		assert_int_equal(d.out_of_order, 0);
	}
	/* kept ones (and their children) outlived their handlers */
	assert_int_equal(talloc_total_blocks(d.keep), 1 + 2 * d.kept);
	talloc_free(mem);
	tu_checks_assert();
}

static bool tp_null_done;

static void tp_null_private(struct tevent_context *ev,
			    struct tevent_immediate *im, void *private_data)
{
	TU_CHECK(im != NULL);
	TU_CHECK(private_data == NULL);
	tp_null_done = true;
}

static void test_thread_proxy(void **state)
{
	uint64_t n = tu_scale(20000);
	struct tevent_context *ev;
	struct evproxy_thread_proxy *tp;
	struct tevent_immediate *im;

	tu_checks_reset();
	run_thread_proxy(&evproxy_tp_ops, "epoll", 4, n);
	run_thread_proxy(&evproxy_tp_ops, "evpoll-auto", 4, n);
	run_thread_proxy(&evproxy_tp_ops, "evpoll-always", 2, n);
	/* the same program on tevent's own: counts, not order */
	run_thread_proxy(&tevent_tp_ops, "epoll", 4, n);

	/* no private pointer; NULL arguments are ignored */
	ev = tu_context(NULL, "epoll");
	errno = 0;
	assert_null(evproxy_thread_proxy_create(NULL));
	assert_int_equal(errno, EINVAL);
	tp = evproxy_thread_proxy_create(ev);
	assert_non_null(tp);
	im = tevent_create_immediate(NULL);
	tp_null_done = false;
	evproxy_thread_proxy_schedule(tp, &im, tp_null_private, NULL);
	assert_null(im);
	loop_until(ev, &tp_null_done, LONG_MS);
	evproxy_thread_proxy_schedule(NULL, &im, tp_null_private, NULL);
	evproxy_thread_proxy_schedule(tp, NULL, tp_null_private, NULL);
	evproxy_thread_proxy_schedule(tp, &im, tp_null_private, NULL);
	im = tevent_create_immediate(NULL);
	evproxy_thread_proxy_schedule(tp, &im, NULL, NULL);
	assert_non_null(im);
	talloc_free(im);
	/* the proxy is a child of the context: freed with it */
	talloc_free(ev);
	tu_checks_assert();
}

/*
 * What a drop-in handler may do with its immediate, on both proxies: the
 * drop-in returns an immediate the handler left alone to a sender, so it
 * must see every other use and behave as tevent's proxy does.
 */
enum im_action {
	IM_LEAVE,		/* nothing: freed after the handler */
	IM_STEAL,		/* keeps it */
	IM_RESCHEDULE,		/* schedules it again without stealing it */
	IM_STEAL_RESCHEDULE,	/* steals it, then schedules it again */
	IM_FREE,		/* frees it */
	IM_CHILD,		/* gives it a child that has a destructor */
	IM_DESTRUCTOR,		/* gives it a destructor */
	IM_REFERENCE,		/* takes a reference to it */
	IM_ACTIONS
};

struct im_case {
	enum im_action action;
	struct tevent_context *ev;
	TALLOC_CTX *keep;
	pthread_t dest_thread;
	atomic_bool first_done;		/* the producer waits for it */
	bool second_done;
	bool refired;			/* a rescheduled immediate ran */
	unsigned destructor_runs;
	bool destructor_elsewhere;	/* ran on another thread */
	struct tevent_immediate *kept;
};

/* one im_case per immediate, found by this thread's destructors */
static struct im_case *im_case_now;

static int im_case_destructor(void *ptr)
{
	struct im_case *c = im_case_now;

	c->destructor_runs++;
	if (!pthread_equal(pthread_self(), c->dest_thread)) {
		c->destructor_elsewhere = true;
	}
	return 0;
}

static void im_refired(struct tevent_context *ev, struct tevent_immediate *im,
		       void *private_data)
{
	struct im_case *c = private_data;

	c->refired = true;
}

static void im_act(struct tevent_context *ev, struct tevent_immediate *im,
		   void *private_data)
{
	struct im_case *c = *(struct im_case **)private_data;
	char *child;

	switch (c->action) {
	case IM_STEAL:
		c->kept = talloc_steal(c->keep, im);
		break;
	case IM_RESCHEDULE:
		tevent_schedule_immediate(im, ev, im_refired, c);
		break;
	case IM_STEAL_RESCHEDULE:
		c->kept = talloc_steal(c->keep, im);
		tevent_schedule_immediate(im, ev, im_refired, c);
		break;
	case IM_FREE:
		talloc_free(im);
		break;
	case IM_CHILD:
		child = talloc_strdup(im, "child");
		TU_CHECK(child != NULL);
		talloc_set_destructor((void *)child, im_case_destructor);
		break;
	case IM_DESTRUCTOR:
		talloc_set_destructor((void *)im, im_case_destructor);
		break;
	case IM_REFERENCE:
		c->kept = talloc_reference(c->keep, im);
		TU_CHECK(c->kept == im);
		break;
	default:
		break;
	}
	atomic_store(&c->first_done, true);
}

static void im_second(struct tevent_context *ev, struct tevent_immediate *im,
		      void *private_data)
{
	struct im_case *c = *(struct im_case **)private_data;

	c->second_done = true;
}

struct im_producer {
	const struct tp_ops *ops;
	void *tp;
	struct im_case *c;
};

/* Off the cmocka thread: send a new immediate, private data -> ptr. */
static void tp_send_ptr(const struct tp_ops *ops, void *tp,
			tevent_immediate_handler_t handler, void *ptr)
{
	struct tevent_immediate *im = tevent_create_immediate(NULL);
	void **pp = talloc(NULL, void *);

	TU_CHECK(im != NULL && pp != NULL);
	*pp = ptr;
	ops->schedule(tp, &im, handler, &pp);
	TU_CHECK(im == NULL && pp == NULL);
}

/* one immediate for the action; once it ran, a second (which collects) */
static void *im_producer_main(void *arg)
{
	struct im_producer *pr = arg;

	tp_send_ptr(pr->ops, pr->tp, im_act, pr->c);
	while (!atomic_load(&pr->c->first_done)) {
		sched_yield();
	}
	tp_send_ptr(pr->ops, pr->tp, im_second, pr->c);
	return NULL;
}

static void run_im_case(const struct tp_ops *ops, enum im_action action)
{
	struct im_case c = { .action = action };
	struct im_producer pr = { .ops = ops, .c = &c };
	pthread_t thread;

	c.ev = tu_context(NULL, "epoll");
	c.keep = talloc_new(NULL);
	c.dest_thread = pthread_self();
	atomic_init(&c.first_done, false);
	im_case_now = &c;
	pr.tp = ops->create(c.ev);
	assert_non_null(pr.tp);
	assert_int_equal(pthread_create(&thread, NULL, im_producer_main, &pr),
			 0);
	loop_until(c.ev, &c.second_done, LONG_MS);
	assert_int_equal(pthread_join(thread, NULL), 0);
	/* tevent frees after the batch: let that and any reschedule run */
	loop_for(c.ev, 5);

	switch (action) {
	case IM_RESCHEDULE:
		/* freed after the handler, so cancelled */
		assert_false(c.refired);
		break;
	case IM_STEAL_RESCHEDULE:
		assert_true(c.refired);
		assert_ptr_equal(talloc_parent(c.kept), c.keep);
		break;
	case IM_STEAL:
		/* still usable */
		assert_ptr_equal(talloc_parent(c.kept), c.keep);
		tevent_schedule_immediate(c.kept, c.ev, im_refired, &c);
		loop_until(c.ev, &c.refired, LONG_MS);
		break;
	case IM_CHILD:
	case IM_DESTRUCTOR:
		/* freed after the handler, on the destination */
		assert_int_equal(c.destructor_runs, 1);
		assert_false(c.destructor_elsewhere);
		break;
	case IM_REFERENCE:
		/* it outlived the handler: talloc keeps referenced chunks */
		assert_true(talloc_get_size(c.kept) > 0);
		break;
	default:
		break;
	}
	if (action == IM_REFERENCE) {
		/* talloc dropped the reference when the holder went */
		assert_int_equal(talloc_reference_count(c.kept), 0);
		talloc_free(c.kept);
	}
	talloc_free(c.keep);
	talloc_free(c.ev);
	im_case_now = NULL;
	tu_checks_assert();
}

static bool im_plain_done;

static void im_plain(struct tevent_context *ev, struct tevent_immediate *im,
		     void *private_data)
{
	im_plain_done = true;
}

static void im_set_bool(struct tevent_context *ev,
			struct tevent_immediate *im, void *private_data)
{
	*(bool *)private_data = true;
}

static void tp_send_plain(const struct tp_ops *ops, void *tp,
			  struct tevent_immediate **pim)
{
	void *priv = talloc_new(NULL);

	assert_non_null(priv);
	im_plain_done = false;
	ops->schedule(tp, pim, im_plain, &priv);
	assert_null(priv);
}

/*
 * An immediate still scheduled on another context when it is sent: the
 * destination cancels that schedule (tevent's proxy reschedules it, which
 * does), so the other context never runs it, nor touches it once freed.
 */
static void run_stale_schedule(const struct tp_ops *ops)
{
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct tevent_context *ev2 = tu_context(NULL, "epoll");
	void *tp = ops->create(ev);
	struct tevent_immediate *im = tevent_create_immediate(NULL);
	bool stale = false;

	assert_non_null(tp);
	assert_non_null(im);
	tevent_schedule_immediate(im, ev2, im_set_bool, &stale);
	tp_send_plain(ops, tp, &im);
	loop_until(ev, &im_plain_done, LONG_MS);
	/* a second send frees what the first handed back */
	im = tevent_create_immediate(NULL);
	tp_send_plain(ops, tp, &im);
	loop_until(ev, &im_plain_done, LONG_MS);
	loop_for(ev, 2);
	loop_for(ev2, 2);
	assert_false(stale);
	talloc_free(ev);
	talloc_free(ev2);
}

/*
 * The handler of the last message frees the proxy while its sender may
 * still be inside the schedule call: tevent's proxy allows it, so must
 * the drop-in (the sanitizers watch for a use after free).
 */
struct tp_last {
	const struct tp_ops *ops;
	void *tp;
	bool done;
};

static void tp_last_handler(struct tevent_context *ev,
			    struct tevent_immediate *im, void *private_data)
{
	struct tp_last *l = *(struct tp_last **)private_data;

	TALLOC_FREE(l->tp);
	l->done = true;
}

static void *tp_last_main(void *arg)
{
	struct tp_last *l = arg;

	tp_send_ptr(l->ops, l->tp, tp_last_handler, l);
	return NULL;
}

static void run_free_on_last(const struct tp_ops *ops, const char *spec,
			     unsigned rounds)
{
	unsigned i;

	for (i = 0; i < rounds; i++) {
		struct tevent_context *ev = tu_context(NULL, spec);
		struct tp_last l = { .ops = ops };
		pthread_t thread;

		l.tp = ops->create(ev);
		assert_non_null(l.tp);
		assert_int_equal(pthread_create(&thread, NULL, tp_last_main,
						&l), 0);
		loop_until(ev, &l.done, LONG_MS);
		assert_int_equal(pthread_join(thread, NULL), 0);
		assert_null(l.tp);
		talloc_free(ev);
	}
}

static void test_thread_proxy_immediates(void **state)
{
	struct tevent_context *ev;
	struct evproxy_thread_proxy *tp;
	struct tevent_immediate *im, *probe;
	void *first;
	bool lifo;
	int a;

	tu_checks_reset();
	for (a = 0; a < IM_ACTIONS; a++) {
		run_im_case(&evproxy_tp_ops, a);
		run_im_case(&tevent_tp_ops, a);
	}
	run_stale_schedule(&evproxy_tp_ops);
	run_stale_schedule(&tevent_tp_ops);
	run_free_on_last(&evproxy_tp_ops, "evpoll-always", tu_scale(2000));
	run_free_on_last(&evproxy_tp_ops, "epoll", tu_scale(500));
	run_free_on_last(&tevent_tp_ops, "epoll", tu_scale(500));

	/*
	 * An immediate left alone goes back to the sender: its next
	 * schedule frees it there, so the allocator can give the memory to
	 * its next tevent_create_immediate(). Only checkable where freed
	 * memory comes straight back (glibc's tcache; not under the
	 * sanitizers or valgrind).
	 */
	probe = tevent_create_immediate(NULL);
	first = probe;
	talloc_free(probe);
	probe = tevent_create_immediate(NULL);
	lifo = probe == first;
	talloc_free(probe);

	ev = tu_context(NULL, "epoll");
	tp = evproxy_thread_proxy_create(ev);
	assert_non_null(tp);
	im = tevent_create_immediate(NULL);
	first = im;
	im_plain_done = false;
	evproxy_thread_proxy_schedule(tp, &im, im_plain, NULL);
	loop_until(ev, &im_plain_done, LONG_MS);
	im = tevent_create_immediate(NULL);
	assert_ptr_not_equal(im, first);
	im_plain_done = false;
	evproxy_thread_proxy_schedule(tp, &im, im_plain, NULL);
	im = tevent_create_immediate(NULL);
	if (lifo) {
		assert_ptr_equal(im, first);
	} else {
		print_message("    allocator does not reuse at once: "
			      "recycling not checked\n");
	}
	talloc_free(im);
	loop_until(ev, &im_plain_done, LONG_MS);
	talloc_free(ev);
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 11. Arguments, freeing from a handler, nested loops */

static void test_api_args(void **state)
{
	struct tevent_context *ev = tu_context(NULL, "epoll");
	struct evproxy_config cfg;
	struct evproxy_stats stats;
	struct evproxy *p;
	unsigned char *m;
	size_t i;

	/* evproxy_msg_new: size, zeroed, top-level, named */
	m = evproxy_msg_new(1000, "my message");
	assert_non_null(m);
	assert_int_equal(talloc_get_size(m), 1000);
	assert_null(talloc_parent(m));
	assert_string_equal(talloc_get_name(m), "my message");
	for (i = 0; i < 1000; i++) {
		assert_int_equal(m[i], 0);
	}
	talloc_free(m);

	evproxy_config_default(&cfg);
	assert_int_equal(cfg.capacity, 0);
	assert_int_equal(cfg.batch, 128);
	evproxy_config_default(NULL);

	cfg.batch = 0;
	errno = 0;
	assert_null(evproxy_create(NULL, ev, &cfg));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evproxy_create(NULL, NULL, NULL));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evproxy_sender(NULL));
	assert_int_equal(errno, EINVAL);
	assert_null(evproxy_sender_ref(NULL));
	evproxy_sender_unref(NULL);

	p = evproxy_create(NULL, ev, NULL);
	assert_non_null(p);
	assert_int_equal(evproxy_get_stats(NULL, &stats), EINVAL);
	assert_int_equal(evproxy_get_stats(p, NULL), EINVAL);
	stats_get(p, &stats);
	assert_int_equal(stats.delivered, 0);
	assert_int_equal(stats.discarded, 0);
	assert_int_equal(stats.kernel_wakeups, 0);
	assert_int_equal(stats.batches, 0);
	talloc_free(p);
	talloc_free(ev);
}

/* A handler frees the evproxy while more messages are queued. */

struct free_state {
	struct evproxy *p;
	unsigned calls;
	unsigned free_at;
	bool freed;
};

static void free_handler(struct tevent_context *ev, void *msg,
			 void *private_data)
{
	struct free_state *fs = private_data;
	struct tmsg *m = tmsg_get(msg);

	TU_CHECK(!fs->freed);
	TU_CHECK(m != NULL && tmsg_child_ok(m));
	fs->calls++;
	if (fs->calls == fs->free_at) {
		/* the message itself is still ours until we return */
		TALLOC_FREE(fs->p);
		fs->freed = true;
		TU_CHECK(m != NULL && tmsg_child_ok(m));
	}
}

static void test_free_from_handler(void **state)
{
	unsigned i, k;

	tu_checks_reset();
	for (i = 0; tu_all_backends[i] != NULL; i++) {
		unsigned batch;

		for (batch = 2; batch <= 128; batch *= 64) {
			struct tevent_context *ev =
				tu_context(NULL, tu_all_backends[i]);
			struct free_state fs = { .free_at = 3 };
			struct evproxy_sender *s;
			struct tmsg *m, *orig;

			fs.p = proxy_new(NULL, ev, 0, batch);
			s = evproxy_sender(fs.p);
			for (k = 0; k < 10; k++) {
				m = tmsg_new_child(0, k);
				assert_int_equal(
					evproxy_send(s, free_handler, &fs, &m),
					0);
			}
			loop_until(ev, &fs.freed, LONG_MS);
			loop_for(ev, 5);
			assert_int_equal(fs.calls, 3);
			m = orig = tmsg_new(0, 99);
			assert_int_equal(evproxy_send(s, free_handler, &fs,
						      &m), ECANCELED);
			assert_ptr_equal(m, orig);
			talloc_free(m);
			evproxy_sender_unref(s);
			talloc_free(ev);
		}
	}
	tu_checks_assert();
}

/* A handler runs a nested loop, which delivers the next messages. */

enum nest_mode {
	NEST_QUEUED,	/* all messages queued before the loop runs */
	NEST_FREE,	/* the same; the third handler frees the proxy */
	NEST_LATE,	/* the others are sent during the nested loop */
};

static const char *const nest_mode_names[] = { "queued", "free", "late" };

struct nest_state {
	struct tevent_context *ev;
	struct evproxy *p;
	struct evproxy_sender *s;
	enum nest_mode mode;
	unsigned depth;
	unsigned delivered;
	unsigned total;
	unsigned nested_deliveries;
	bool timed_out;
	bool done;
	bool freed;
};

static void nest_handler(struct tevent_context *ev, void *msg,
			 void *private_data);

static void *nest_late_thread(void *arg)
{
	struct nest_state *ns = arg;
	unsigned k;

	for (k = 1; k < ns->total; k++) {
		struct tmsg *m = tmsg_new_child(0, k);

		TU_CHECK(evproxy_send(ns->s, nest_handler, ns, &m) == 0);
	}
	return NULL;
}

static void nest_handler(struct tevent_context *ev, void *msg,
			 void *private_data)
{
	struct nest_state *ns = private_data;
	struct tmsg *m = tmsg_get(msg);
	struct tevent_timer *te;
	pthread_t t;

	TU_CHECK(!ns->freed);
	TU_CHECK(m != NULL && m->seq == ns->delivered);
	ns->delivered++;
	if (ns->depth > 0) {
		ns->nested_deliveries++;
	}
	if (ns->mode == NEST_FREE && ns->delivered == 3) {
		TALLOC_FREE(ns->p);
		ns->freed = true;
	}
	ns->done = ns->delivered == ns->total || ns->freed;
	if (m == NULL || m->seq != 0) {
		return;
	}

	/* the first handler waits in a nested loop for the others */
	if (ns->mode == NEST_LATE) {
		TU_CHECK(pthread_create(&t, NULL, nest_late_thread, ns) == 0);
	}
	te = tevent_add_timer(ev, NULL, tevent_timeval_current_ofs(0, 250000),
			      set_flag, &ns->timed_out);
	ns->depth++;
	while (!ns->done && !ns->timed_out) {
		if (tevent_loop_once(ev) != 0) {
			TU_CHECK(false);
			break;
		}
	}
	ns->depth--;
	TU_CHECK(!ns->timed_out);
	if (!ns->timed_out) {
		/* a timer that fired is gone already */
		talloc_free(te);
	}
	if (ns->mode == NEST_LATE) {
		TU_CHECK(pthread_join(t, NULL) == 0);
	}
	/* still ours after the nested deliveries */
	TU_CHECK(tmsg_child_ok(m));
}

static void allow_nesting(struct tevent_context *ev)
{
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
	tevent_loop_allow_nesting(ev);
#pragma GCC diagnostic pop
}

static void test_nested_loop(void **state)
{
	unsigned i, k, mode;

	tu_checks_reset();
	for (i = 0; tu_all_backends[i] != NULL; i++) {
		for (mode = NEST_QUEUED; mode <= NEST_LATE; mode++) {
			struct tevent_context *ev =
				tu_context(NULL, tu_all_backends[i]);
			struct nest_state ns = {
				.ev = ev, .total = 5, .mode = mode,
			};
			unsigned before = tu_check_failures();
			unsigned nqueued = mode == NEST_LATE ? 1 : ns.total;

			allow_nesting(ev);
			ns.p = proxy_new(NULL, ev, 0, 0);
			ns.s = evproxy_sender(ns.p);
			for (k = 0; k < nqueued; k++) {
				struct tmsg *m = tmsg_new_child(0, k);

				assert_int_equal(evproxy_send(ns.s,
							      nest_handler,
							      &ns, &m), 0);
			}
			loop_until(ev, &ns.done, LONG_MS);
			loop_for(ev, 5);
			if (mode == NEST_FREE) {
				TU_CHECK(ns.delivered == 3);
				TU_CHECK(ns.nested_deliveries == 2);
			} else {
				TU_CHECK(ns.delivered == ns.total);
				TU_CHECK(ns.nested_deliveries == ns.total - 1);
			}
			if (tu_check_failures() != before) {
				print_message("    nested loop on %s (%s): "
					      "%u delivered, %u of them in "
					      "the nested loop\n",
					      tu_all_backends[i],
					      nest_mode_names[mode],
					      ns.delivered,
					      ns.nested_deliveries);
			}
			evproxy_sender_unref(ns.s);
			talloc_free(ns.p);
			talloc_free(ev);
		}
	}
	tu_checks_assert();
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_api_args),
		cmocka_unit_test(test_null_tracking),
		cmocka_unit_test(test_basic_delivery),
		cmocka_unit_test(test_fifo_unbounded),
		cmocka_unit_test(test_fifo_bounded),
		cmocka_unit_test(test_fan_in),
		cmocka_unit_test(test_ownership_in_handler),
		cmocka_unit_test(test_ownership_errors),
		cmocka_unit_test(test_destination_gone),
		cmocka_unit_test(test_destination_race),
		cmocka_unit_test(test_bounded_capacity),
		cmocka_unit_test(test_backpressure),
		cmocka_unit_test(test_backpressure_args),
		cmocka_unit_test(test_backpressure_chain),
		cmocka_unit_test(test_batch_yield),
		cmocka_unit_test(test_kernel_wakeups),
		cmocka_unit_test(test_request_reply),
		cmocka_unit_test(test_thread_proxy),
		cmocka_unit_test(test_thread_proxy_immediates),
		cmocka_unit_test(test_free_from_handler),
		cmocka_unit_test(test_nested_loop),
	};

	/* the ownership rules of messages require it */
	talloc_disable_null_tracking();
	if (argc > 1) {
		/* a test name pattern, e.g. "test_fifo*" */
		cmocka_set_test_filter(argv[1]);
	}
	return cmocka_run_group_tests(tests, NULL, NULL);
}
