/*
 * Stress and lifetime tests of evproxy's doorbells and messages
 * (include/evproxy.h) on evpoll loops (AUTO, ALWAYS) and on tevent's stock
 * epoll backend.
 *
 * 1. Stress: 8 producer threads each send N messages and ring N times,
 *    alternating between two consumer loops (each consumer thread owns one
 *    evproxy and one doorbell). Every message is delivered exactly once,
 *    in FIFO order per producer and destination, and the rings the
 *    doorbell handlers are told about add up exactly to the rings made.
 *    N = tu_scale(100000): 100,000 for 'make test', 10,000 for the
 *    sanitizer and valgrind runs, 1,000,000 for 'make stress'. 'make test'
 *    runs the full N on every backend.
 * 2. Lifetime: tu_scale(10000) rounds that free the destination (the
 *    evproxy, the doorbell or the whole tevent context, in turn) while 3
 *    threads send and ring without pause: no crash, no leak (valgrind,
 *    ASan), exact accounting of every message, see test_lifetime().
 * 3. fork(): the child uses fresh loops, evproxies and doorbells between
 *    two threads of its own; what it inherited is dead (ECANCELED); a child
 *    that runs the inherited loop does not deliver the parent's messages;
 *    the parent's loops keep working after the child exits.
 *
 * Checks made off the cmocka thread (consumer, producer and worker
 * threads, forked children) only count failures, which the cmocka thread
 * then asserts are 0. A lost wake-up shows up as a hang, which the
 * watchdog turns into a failure. No assertion depends on timing.
 */

#include <errno.h>
#include <inttypes.h>
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
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <talloc.h>
#include <tevent.h>

#include "evpoll.h"
#include "evproxy.h"
/*
 * White box, for one counter only: the number of queued messages the
 * library freed when an evproxy was freed (struct evproxy_sender's
 * 'discarded'), which evproxy_get_stats() can no longer report once the
 * evproxy itself is gone. See test_lifetime().
 */
#include "evproxy/proxy_internal.h"
#include "testutil.h"

#define NPRODUCERS 8
#define NCONSUMERS 2
#define NWORKERS 3
#define SMSG_MAGIC 0x53545253u
/* a hang (lost wake-up) ends the program with a message */
#define WATCHDOG_SECONDS 840


#define CHECK_U64(a, b) \
	check_u64((uint64_t)(a), (uint64_t)(b), #a, #b, __FILE__, __LINE__)

/* cmocka thread only */
static void check_u64(uint64_t a, uint64_t b, const char *sa, const char *sb,
		      const char *file, int line)
{
	if (a != b) {
		fail_msg("%s:%d: %s == %" PRIu64 ", expected %s == %" PRIu64,
			 file, line, sa, a, sb, b);
	}
}

/* ------------------------------------------------------------------ */
/* Watchdog */

static void watchdog_fired(int sig)
{
	static const char msg[] =
		"test_stress: watchdog: a test hung (lost wake-up?)\n";
	ssize_t n = write(STDERR_FILENO, msg, sizeof(msg) - 1);

	(void)n;
	_exit(97);
}

static int setup(void **state)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = watchdog_fired;
	sigaction(SIGALRM, &sa, NULL);
	alarm(WATCHDOG_SECONDS);
	tu_checks_reset();
	return 0;
}

static int teardown(void **state)
{
	alarm(0);
	return 0;
}

/* ------------------------------------------------------------------ */
/* Shared helpers */

static void timer_fired(struct tevent_context *ev, struct tevent_timer *te,
			struct timeval now, void *private_data)
{
	bool *fired = private_data;

	*fired = true;
}

/* Run the loop until a timer of @p ms fires. 0 or -1. No cmocka. */
static int run_for(struct tevent_context *ev, unsigned ms)
{
	bool fired = false;

	if (tevent_add_timer(ev, ev, tevent_timeval_current_ofs(0, ms * 1000),
			     timer_fired, &fired) == NULL) {
		return -1;
	}
	while (!fired) {
		if (tevent_loop_once(ev) != 0) {
			return -1;
		}
	}
	return 0;
}

/* What a message carries: who sent it, to whom, its number. */
struct smsg {
	uint32_t magic;
	uint32_t producer;
	uint32_t dest;
	uint32_t round;
	uint64_t seq;
};

static struct smsg *smsg_new(uint32_t producer, uint32_t dest, uint64_t seq)
{
	struct smsg *m = evproxy_msg_new(sizeof(*m), "struct smsg");

	if (m == NULL) {
		return NULL;
	}
	m->magic = SMSG_MAGIC;
	m->producer = producer;
	m->dest = dest;
	m->seq = seq;
	return m;
}

/* ------------------------------------------------------------------ */
/* Consumer loops: one thread each, owning a loop, an evproxy, a doorbell */

struct consumer {
	pthread_t thread;
	unsigned idx;
	const char *spec;
	uint64_t expect_msgs;
	uint64_t expect_rings;

	/* published (release) once 'ready' is set */
	struct evproxy_sender *s;
	struct evproxy_ringer *r;
	atomic_bool ready;
	atomic_bool failed_setup;
	/* set by the cmocka thread once every producer has returned */
	atomic_bool producers_done;

	/* owner thread; read by others after the join */
	uint64_t delivered;
	uint64_t rings;
	uint64_t ring_calls;
	uint64_t next_seq[NPRODUCERS];
	uint64_t bad;		/* wrong magic, producer or destination */
	uint64_t out_of_order;	/* FIFO broken, duplicates, losses */
	struct evproxy_stats pstats;
	struct evproxy_doorbell_stats dstats;
	uint64_t after_delivered;	/* counts once the loop ran idle */
	uint64_t after_rings;
	/*
	 * Set by another thread: the loop thread stops between two
	 * iterations (and sets 'paused') until 'pause' is cleared again.
	 */
	atomic_bool pause;
	atomic_bool paused;
	struct tevent_context *ev;	/* for a fork child, see test_fork */
};

static void consumer_msg(struct tevent_context *ev, void *msg,
			 void *private_data)
{
	struct consumer *c = private_data;
	struct smsg *m = talloc_get_type(msg, struct smsg);

	c->delivered++;
	if (m == NULL || m->magic != SMSG_MAGIC ||
	    m->producer >= NPRODUCERS || m->dest != c->idx) {
		c->bad++;
		return;
	}
	if (m->seq != c->next_seq[m->producer]) {
		if (c->out_of_order++ < 5) {
			fprintf(stderr, "[%s] consumer %u: producer %u: got "
				"#%" PRIu64 ", expected #%" PRIu64 "\n",
				c->spec, c->idx, m->producer, m->seq,
				c->next_seq[m->producer]);
		}
		/* resynchronise, to report each break once */
		c->next_seq[m->producer] = m->seq;
	}
	c->next_seq[m->producer]++;
}

static void consumer_ring(struct tevent_context *ev,
			  struct evproxy_doorbell *db, uint64_t rings,
			  void *private_data)
{
	struct consumer *c = private_data;

	c->ring_calls++;
	c->rings += rings;
}

static void *consumer_thread(void *arg)
{
	struct consumer *c = arg;
	struct tevent_context *ev = tu_context_try(NULL, c->spec);
	struct evproxy *p = NULL;
	struct evproxy_doorbell *db = NULL;

	if (ev != NULL) {
		p = evproxy_create(ev, ev, NULL);
		db = evproxy_add_doorbell(ev, ev, consumer_ring, c);
	}
	if (p == NULL || db == NULL) {
		atomic_store(&c->failed_setup, true);
		atomic_store(&c->ready, true);
		talloc_free(ev);
		return NULL;
	}
	c->s = evproxy_sender(p);
	c->r = evproxy_doorbell_ringer(db);
	c->ev = ev;
	atomic_store_explicit(&c->ready, true, memory_order_release);

	while (c->delivered < c->expect_msgs || c->rings < c->expect_rings) {
		if (atomic_load(&c->pause)) {
			atomic_store(&c->paused, true);
			while (atomic_load(&c->pause)) {
				sched_yield();
			}
			atomic_store(&c->paused, false);
		}
		if (tevent_loop_once(ev) != 0) {
			TU_CHECK(!"tevent_loop_once failed");
			break;
		}
	}
	/*
	 * Everything expected arrived. Once no producer can send any more,
	 * run the loop idle for a moment: nothing else may arrive (no
	 * duplicates, no rings counted twice).
	 */
	while (!atomic_load(&c->producers_done)) {
		sched_yield();
	}
	TU_CHECK(run_for(ev, 2) == 0);
	c->after_delivered = c->delivered;
	c->after_rings = c->rings;
	TU_CHECK(evproxy_get_stats(p, &c->pstats) == 0);
	TU_CHECK(evproxy_doorbell_get_stats(db, &c->dstats) == 0);
	talloc_free(ev);
	return NULL;
}

static void consumers_start(struct consumer *cons, unsigned n,
			    const char *spec, const uint64_t *msgs,
			    const uint64_t *rings)
{
	unsigned i;

	for (i = 0; i < n; i++) {
		memset(&cons[i], 0, sizeof(cons[i]));
		cons[i].idx = i;
		cons[i].spec = spec;
		cons[i].expect_msgs = msgs[i];
		cons[i].expect_rings = rings[i];
		assert_int_equal(pthread_create(&cons[i].thread, NULL,
						consumer_thread, &cons[i]),
				 0);
	}
	for (i = 0; i < n; i++) {
		while (!atomic_load_explicit(&cons[i].ready,
					     memory_order_acquire)) {
			sched_yield();
		}
	}
	for (i = 0; i < n; i++) {
		assert_false(atomic_load(&cons[i].failed_setup));
	}
}

/* ------------------------------------------------------------------ */
/* 1. Stress */

struct producer {
	pthread_t thread;
	unsigned id;
	uint64_t n;
	struct consumer *cons;
	pthread_barrier_t *start;
	uint64_t sent[NCONSUMERS];
	uint64_t rung[NCONSUMERS];
};

/* Producer @p id sends item @p i to this consumer: an even split. */
static unsigned dest_of(unsigned id, uint64_t i)
{
	return (unsigned)((i + id) % NCONSUMERS);
}

static void *producer_thread(void *arg)
{
	struct producer *pr = arg;
	uint64_t i;

	pthread_barrier_wait(pr->start);
	for (i = 0; i < pr->n; i++) {
		unsigned d = dest_of(pr->id, i);
		struct consumer *c = &pr->cons[d];
		struct smsg *m = smsg_new(pr->id, d, pr->sent[d]);
		int ret;

		if (m == NULL) {
			TU_CHECK(!"no memory for a message");
			break;
		}
		ret = evproxy_send(c->s, consumer_msg, c, &m);
		TU_CHECK(ret == 0);
		if (ret != 0) {
			talloc_free(m);
			break;
		}
		TU_CHECK(m == NULL);
		pr->sent[d]++;
		/* the ring goes the other way, so each loop gets both */
		d = (d + 1) % NCONSUMERS;
		ret = evproxy_ringer_ring(pr->cons[d].r);
		TU_CHECK(ret == 0);
		if (ret != 0) {
			break;
		}
		pr->rung[d]++;
	}
	return NULL;
}

static void stress_backend(const char *spec, uint64_t n)
{
	struct consumer cons[NCONSUMERS];
	struct producer prod[NPRODUCERS];
	pthread_barrier_t start;
	uint64_t msgs[NCONSUMERS] = { 0 }, rings[NCONSUMERS] = { 0 };
	uint64_t i, t0 = tu_now_ns();
	unsigned k, d;

	/* what each consumer must get */
	for (k = 0; k < NPRODUCERS; k++) {
		for (i = 0; i < n; i++) {
			d = dest_of(k, i);
			msgs[d]++;
			rings[(d + 1) % NCONSUMERS]++;
		}
	}
	consumers_start(cons, NCONSUMERS, spec, msgs, rings);

	assert_int_equal(pthread_barrier_init(&start, NULL, NPRODUCERS), 0);
	for (k = 0; k < NPRODUCERS; k++) {
		memset(&prod[k], 0, sizeof(prod[k]));
		prod[k].id = k;
		prod[k].n = n;
		prod[k].cons = cons;
		prod[k].start = &start;
		assert_int_equal(pthread_create(&prod[k].thread, NULL,
						producer_thread, &prod[k]),
				 0);
	}
	for (k = 0; k < NPRODUCERS; k++) {
		assert_int_equal(pthread_join(prod[k].thread, NULL), 0);
	}
	pthread_barrier_destroy(&start);
	for (d = 0; d < NCONSUMERS; d++) {
		atomic_store(&cons[d].producers_done, true);
	}
	for (d = 0; d < NCONSUMERS; d++) {
		assert_int_equal(pthread_join(cons[d].thread, NULL), 0);
		evproxy_sender_unref(cons[d].s);
		evproxy_ringer_unref(cons[d].r);
	}
	tu_checks_assert();

	for (d = 0; d < NCONSUMERS; d++) {
		struct consumer *c = &cons[d];

		CHECK_U64(c->bad, 0);
		CHECK_U64(c->out_of_order, 0);
		CHECK_U64(c->delivered, msgs[d]);
		CHECK_U64(c->after_delivered, msgs[d]);
		CHECK_U64(c->rings, rings[d]);
		CHECK_U64(c->after_rings, rings[d]);
		for (k = 0; k < NPRODUCERS; k++) {
			/* the last number each producer sent, plus one */
			CHECK_U64(c->next_seq[k], prod[k].sent[d]);
		}
		CHECK_U64(c->pstats.delivered, msgs[d]);
		CHECK_U64(c->pstats.discarded, 0);
		CHECK_U64(c->dstats.rings, rings[d]);
		CHECK_U64(c->dstats.pending, 0);
		CHECK_U64(c->dstats.handler_calls, c->ring_calls);
		CHECK_U64(c->dstats.ring_wakeups + c->dstats.wakeups_avoided,
			  rings[d]);
	}
	for (k = 0; k < NPRODUCERS; k++) {
		CHECK_U64(prod[k].sent[0] + prod[k].sent[1], n);
		CHECK_U64(prod[k].rung[0] + prod[k].rung[1], n);
	}
	print_message("    %-14s %d x %" PRIu64 " messages and rings: "
		      "%.0f ms (%" PRIu64 "+%" PRIu64 " ring handler calls)\n",
		      spec, NPRODUCERS, n, (tu_now_ns() - t0) / 1e6,
		      cons[0].ring_calls, cons[1].ring_calls);
}

/*
 * Every backend gets the full N = tu_scale(100000) messages and rings per
 * producer, so 'make stress' (EVPROXY_STRESS=full) runs 8 x 1,000,000 of
 * each on evpoll AUTO, evpoll ALWAYS and epoll.
 */
static void test_stress_evpoll_auto(void **state)
{
	stress_backend("evpoll-auto", tu_scale(100000));
}

static void test_stress_evpoll_always(void **state)
{
	stress_backend("evpoll-always", tu_scale(100000));
}

static void test_stress_epoll(void **state)
{
	stress_backend("epoll", tu_scale(100000));
}

/* ------------------------------------------------------------------ */
/* 2. Lifetime */

enum victim {
	FREE_EVPROXY = 0,
	FREE_DOORBELL,
	FREE_CONTEXT,
	NVICTIMS,
};

struct life;

struct worker {
	pthread_t thread;
	unsigned id;
	struct life *L;
	/* results of the current round, read by main once 'done' counts it */
	uint64_t sent_ok;
	uint64_t sent_canceled;
	uint64_t rung_ok;
	uint64_t rung_canceled;
	uint64_t errors;
	/* send-and-ring pairs made, for the main thread */
	atomic_uint_fast64_t ops;
	/* one send and one ring after the destination was freed */
	int final_send;
	int final_ring;
};

struct life {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint64_t round;		/* under lock: the round to work on */
	bool quit;		/* under lock */
	unsigned done;		/* under lock: workers through the round */
	struct evproxy_sender *s;	/* under lock: this round's */
	struct evproxy_ringer *r;
	unsigned started;	/* under lock: workers that made an attempt */
	atomic_bool stop;	/* the victim is freed: stop the round */
	/* main waits on cond for 'ops' to advance: workers broadcast */
	atomic_bool watch;
	struct worker w[NWORKERS];

	/* main thread: what the destination saw this round */
	uint64_t delivered;
	uint64_t rings;
	uint64_t next_seq[NWORKERS];
	uint64_t bad;
};

static void life_msg(struct tevent_context *ev, void *msg, void *private_data)
{
	struct life *L = private_data;
	struct smsg *m = talloc_get_type(msg, struct smsg);

	L->delivered++;
	if (m == NULL || m->magic != SMSG_MAGIC || m->producer >= NWORKERS ||
	    m->round != (uint32_t)L->round ||
	    m->seq != L->next_seq[m->producer]) {
		L->bad++;
		return;
	}
	L->next_seq[m->producer]++;
}

static void life_ring(struct tevent_context *ev, struct evproxy_doorbell *db,
		      uint64_t rings, void *private_data)
{
	struct life *L = private_data;

	L->rings += rings;
}

/* One send; counts the result. Returns the error. */
static int worker_send(struct worker *w, struct evproxy_sender *s,
		       uint32_t round, bool *canceled)
{
	struct smsg *m = smsg_new(w->id, 0, w->sent_ok);
	struct smsg *orig = m;
	int ret;

	if (m == NULL) {
		w->errors++;
		return ENOMEM;
	}
	m->round = round;
	ret = evproxy_send(s, life_msg, w->L, &m);
	switch (ret) {
	case 0:
		w->sent_ok++;
		if (m != NULL || *canceled) {
			/* a send after ECANCELED must not succeed */
			w->errors++;
		}
		break;
	case ECANCELED:
	case EAGAIN:
		/* still ours, untouched */
		if (m != orig || talloc_get_type(m, struct smsg) == NULL ||
		    talloc_parent(m) != NULL) {
			w->errors++;
		}
		if (ret == ECANCELED) {
			w->sent_canceled++;
			*canceled = true;
		}
		talloc_free(m);
		break;
	default:
		w->errors++;
		talloc_free(m);
		break;
	}
	return ret;
}

static int worker_ring(struct worker *w, struct evproxy_ringer *r,
		       bool *canceled)
{
	int ret = evproxy_ringer_ring(r);

	if (ret == 0) {
		w->rung_ok++;
		if (*canceled) {
			w->errors++;
		}
	} else if (ret == ECANCELED) {
		w->rung_canceled++;
		*canceled = true;
	} else {
		w->errors++;
	}
	return ret;
}

/* ~10 us, without spinning: lets the main thread run on a busy machine */
static void pause_briefly(void)
{
	struct timespec ts = { .tv_sec = 0, .tv_nsec = 10000 };

	nanosleep(&ts, NULL);
}

/* Main thread: wait until every worker made 2 more attempts than @p ops. */
static void life_wait_ops(struct life *L, const uint64_t *ops)
{
	unsigned k;

	/* seq_cst: a worker either sees 'watch' or we see its attempt */
	atomic_store(&L->watch, true);
	pthread_mutex_lock(&L->lock);
	for (k = 0; k < NWORKERS; k++) {
		while (atomic_load(&L->w[k].ops) < ops[k] + 2) {
			pthread_cond_wait(&L->cond, &L->lock);
		}
	}
	pthread_mutex_unlock(&L->lock);
	atomic_store(&L->watch, false);
}

static void *worker_thread(void *arg)
{
	struct worker *w = arg;
	struct life *L = w->L;
	uint64_t round = 0;

	for (;;) {
		struct evproxy_sender *s;
		struct evproxy_ringer *r;
		bool send_canceled = false, ring_canceled = false;
		bool first = true;
		uint64_t budget;

		pthread_mutex_lock(&L->lock);
		while (!L->quit && L->round == round) {
			pthread_cond_wait(&L->cond, &L->lock);
		}
		if (L->quit) {
			pthread_mutex_unlock(&L->lock);
			return NULL;
		}
		round = L->round;
		s = evproxy_sender_ref(L->s);
		r = evproxy_ringer_ref(L->r);
		pthread_mutex_unlock(&L->lock);

		w->sent_ok = w->sent_canceled = 0;
		w->rung_ok = w->rung_canceled = 0;
		w->errors = 0;
		/*
		 * Full speed for a varying burst, then a short sleep
		 * between attempts: rounds stay short on a loaded 2-core
		 * machine (4 threads want the CPU), and the free lands at
		 * different points of the workers' runs.
		 */
		budget = 1 + (round * 31 + w->id * 17) % 256;
		while (!atomic_load(&L->stop)) {
			worker_send(w, s, (uint32_t)round, &send_canceled);
			worker_ring(w, r, &ring_canceled);
			/* seq_cst, then 'watch': pairs with life_wait_ops() */
			atomic_fetch_add(&w->ops, 1);
			if (first || atomic_load(&L->watch)) {
				pthread_mutex_lock(&L->lock);
				if (first) {
					L->started++;
					first = false;
				}
				pthread_cond_broadcast(&L->cond);
				pthread_mutex_unlock(&L->lock);
			}
			if (budget > 0) {
				budget--;
			} else {
				pause_briefly();
			}
		}
		/* the victim is gone by now: its users must see ECANCELED */
		w->final_send = worker_send(w, s, (uint32_t)round,
					    &send_canceled);
		w->final_ring = worker_ring(w, r, &ring_canceled);
		evproxy_sender_unref(s);
		evproxy_ringer_unref(r);

		pthread_mutex_lock(&L->lock);
		L->done++;
		pthread_cond_broadcast(&L->cond);
		pthread_mutex_unlock(&L->lock);
	}
}

/* Run @p ev until *count >= target (main thread). */
static void loop_until_count(struct tevent_context *ev, const uint64_t *count,
			     uint64_t target)
{
	while (*count < target) {
		assert_int_equal(tevent_loop_once(ev), 0);
	}
}

/*
 * Each round creates a loop (epoll, evpoll AUTO, evpoll ALWAYS in turn),
 * an evproxy (talloc parent NULL, not the loop; unbounded, or bounded to 8
 * messages so that EAGAIN happens too) and a doorbell (a child of the
 * loop). NWORKERS threads send and ring without pause until told to stop.
 * Once one, two or all of them started, the main thread (the owner) runs
 * the loop a little or not at all, frees the victim, waits until every
 * worker made two more attempts (so each went on across the free), then
 * stops them. Every worker makes one last send and ring after that, which
 * must fail with ECANCELED for the victim and succeed for the survivor.
 *
 * Exact accounting of messages, sends that returned 0 (S) against
 * deliveries (D, counted by the handler, which also checks FIFO order and
 * that nothing arrives twice) and discards (X, queued messages the library
 * freed when the destination went away): S == D + X, where
 * - evproxy freed: X is read from the sender core that the main thread
 *   still holds a reference to (white box, see the include above): the
 *   evproxy itself, and evproxy_get_stats() with it, are gone;
 * - doorbell freed: the evproxy lives on, so the loop delivers everything
 *   and X == 0, also in evproxy_get_stats();
 * - context freed: the evproxy, parented elsewhere, survives the context
 *   with its statistics: evproxy_get_stats() gives D and X.
 * The memory of the X discarded messages must really be freed, once:
 * valgrind and ASan (leaks, double frees) check that part.
 *
 * Rings: while the doorbell lives, every ring that returned 0 is delivered
 * (evproxy freed: the loop runs until the handler saw them all). Rings
 * pending when the doorbell or its loop is freed are discarded without a
 * count the API exposes, so there the check is delivered <= rung.
 */
static void test_lifetime(void **state)
{
	static const char *const specs[] = {
		"epoll", "evpoll-auto", "evpoll-always",
	};
	struct life *L = talloc_zero(NULL, struct life);
	uint64_t rounds = tu_scale(10000), r, t0 = tu_now_ns();
	uint64_t tot_sent = 0, tot_delivered = 0, tot_discarded = 0;
	uint64_t tot_rung = 0, tot_rings = 0, tot_lossy = 0;
	unsigned k;

	assert_non_null(L);
	pthread_mutex_init(&L->lock, NULL);
	pthread_cond_init(&L->cond, NULL);
	for (k = 0; k < NWORKERS; k++) {
		L->w[k].id = k;
		L->w[k].L = L;
		assert_int_equal(pthread_create(&L->w[k].thread, NULL,
						worker_thread, &L->w[k]),
				 0);
	}

	for (r = 1; r <= rounds; r++) {
		enum victim victim = (enum victim)(r % NVICTIMS);
		const char *spec = specs[(r / NVICTIMS) % 3];
		struct evproxy_config cfg;
		struct tevent_context *ev = tu_context(NULL, spec);
		struct evproxy *p;
		struct evproxy_doorbell *db;
		struct evproxy_sender *s;
		struct evproxy_ringer *rr;
		struct evproxy_stats st;
		uint64_t sent = 0, canceled = 0, rung = 0, discarded;
		uint64_t ops[NWORKERS];

		evproxy_config_default(&cfg);
		/* bounded queues (EAGAIN) every other group of rounds */
		cfg.capacity = (r / (NVICTIMS * 3)) % 2 ? 8 : 0;
		p = evproxy_create(NULL, ev, &cfg);
		assert_non_null(p);
		db = evproxy_add_doorbell(ev, ev, life_ring, L);
		assert_non_null(db);
		s = evproxy_sender(p);
		rr = evproxy_doorbell_ringer(db);
		assert_non_null(s);
		assert_non_null(rr);
		L->delivered = L->rings = L->bad = 0;
		memset(L->next_seq, 0, sizeof(L->next_seq));

		pthread_mutex_lock(&L->lock);
		L->s = s;
		L->r = rr;
		L->done = 0;
		L->started = 0;
		atomic_store(&L->stop, false);
		L->round = r;
		pthread_cond_broadcast(&L->cond);
		pthread_mutex_unlock(&L->lock);

		/* free while one, two or all workers are at it */
		pthread_mutex_lock(&L->lock);
		while (L->started < 1 + r % NWORKERS) {
			pthread_cond_wait(&L->cond, &L->lock);
		}
		pthread_mutex_unlock(&L->lock);
		if (r % 4 != 0) {
			/*
			 * Deliver some first. A worker that started rang at
			 * least once (rings only fail once the doorbell is
			 * gone), so the loop does not wait for ever.
			 */
			loop_until_count(ev, &L->rings, 1);
		}
		for (k = 0; k < NWORKERS; k++) {
			ops[k] = atomic_load(&L->w[k].ops);
		}
		switch (victim) {
		case FREE_EVPROXY:
			TALLOC_FREE(p);
			break;
		case FREE_DOORBELL:
			TALLOC_FREE(db);
			break;
		case FREE_CONTEXT:
			TALLOC_FREE(ev);
			break;
		default:
			break;
		}
		/* the workers go on after the free: wait for 2 more each */
		life_wait_ops(L, ops);
		pthread_mutex_lock(&L->lock);
		atomic_store(&L->stop, true);
		pthread_cond_broadcast(&L->cond);
		while (L->done < NWORKERS) {
			pthread_cond_wait(&L->cond, &L->lock);
		}
		pthread_mutex_unlock(&L->lock);

		for (k = 0; k < NWORKERS; k++) {
			struct worker *w = &L->w[k];

			CHECK_U64(w->errors, 0);
			sent += w->sent_ok;
			canceled += w->sent_canceled;
			rung += w->rung_ok;
			if (victim == FREE_DOORBELL) {
				assert_true(w->final_send == 0 ||
					    w->final_send == EAGAIN);
			} else {
				assert_int_equal(w->final_send, ECANCELED);
			}
			if (victim == FREE_EVPROXY) {
				assert_int_equal(w->final_ring, 0);
			} else {
				assert_int_equal(w->final_ring, ECANCELED);
			}
		}

		switch (victim) {
		case FREE_EVPROXY:
			/* the doorbell lives: every ring arrives */
			loop_until_count(ev, &L->rings, rung);
			CHECK_U64(L->rings, rung);
			discarded = atomic_load(&s->discarded);
			break;
		case FREE_DOORBELL:
			/* the evproxy lives: every message arrives */
			CHECK_U64(canceled, 0);
			loop_until_count(ev, &L->delivered, sent);
			assert_int_equal(evproxy_get_stats(p, &st), 0);
			CHECK_U64(st.delivered, L->delivered);
			discarded = st.discarded;
			CHECK_U64(discarded, 0);
			assert_true(L->rings <= rung);
			break;
		case FREE_CONTEXT:
		default:
			assert_int_equal(evproxy_get_stats(p, &st), 0);
			CHECK_U64(st.delivered, L->delivered);
			discarded = st.discarded;
			assert_true(L->rings <= rung);
			break;
		}
		CHECK_U64(L->bad, 0);
		CHECK_U64(L->delivered + discarded, sent);
		for (k = 0; k < NWORKERS; k++) {
			/* FIFO: each worker's deliveries are a prefix */
			assert_true(L->next_seq[k] <= L->w[k].sent_ok);
		}
		tot_sent += sent;
		tot_delivered += L->delivered;
		tot_discarded += discarded;
		tot_rung += rung;
		tot_rings += L->rings;
		tot_lossy += discarded > 0 ? 1 : 0;

		talloc_free(p);
		talloc_free(ev);
		evproxy_sender_unref(s);
		evproxy_ringer_unref(rr);
	}

	pthread_mutex_lock(&L->lock);
	L->quit = true;
	pthread_cond_broadcast(&L->cond);
	pthread_mutex_unlock(&L->lock);
	for (k = 0; k < NWORKERS; k++) {
		assert_int_equal(pthread_join(L->w[k].thread, NULL), 0);
	}
	pthread_cond_destroy(&L->cond);
	pthread_mutex_destroy(&L->lock);
	talloc_free(L);
	/* how often messages were queued at the free: information only */
	print_message("    %" PRIu64 " rounds (%" PRIu64 " freed queued "
		      "messages): %" PRIu64 " sent, %" PRIu64 " delivered, %"
		      PRIu64 " discarded; %" PRIu64 " rung, %" PRIu64
		      " rings delivered; %.0f ms\n", rounds, tot_lossy,
		      tot_sent, tot_delivered, tot_discarded, tot_rung,
		      tot_rings, (tu_now_ns() - t0) / 1e6);
	tu_checks_assert();
}

/* ------------------------------------------------------------------ */
/* 3. fork() */

/*
 * What the child inherited, in globals: reachable, so valgrind's leak
 * check in the child does not count the parent's objects (which the child
 * must not free: their loop thread does not exist there) as lost.
 */
static struct {
	struct evproxy_sender *s;
	struct evproxy_ringer *r;
	struct tevent_context *ev;
} inherited;

static void never_msg(struct tevent_context *ev, void *msg,
		      void *private_data)
{
	TU_CHECK(!"a message handler ran for a dead evproxy");
}

/* Child: the inherited objects are dead here. 0 or an exit code. */
static int child_inherited_checks(void)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context_try(mem, "epoll");
	struct smsg *m = smsg_new(0, 0, 0);
	struct smsg *orig = m;
	struct tevent_req *req;
	int ret;

	if (mem == NULL || ev == NULL || m == NULL) {
		return 30;
	}
	ret = evproxy_send(inherited.s, never_msg, NULL, &m);
	if (ret != ECANCELED) {
		fprintf(stderr, "child: send to an inherited evproxy "
			"returned %d, expected ECANCELED\n", ret);
		return 31;
	}
	if (m != orig || talloc_parent(m) != NULL) {
		return 32;
	}
	if (evproxy_ringer_ring(inherited.r) != ECANCELED) {
		return 33;
	}
	/* with backpressure, waiting on the child's own loop */
	req = evproxy_send_send(mem, ev, inherited.s, never_msg, NULL, &m);
	if (req == NULL || !tevent_req_poll(req, ev)) {
		return 34;
	}
	ret = evproxy_send_recv(req);
	if (ret != ECANCELED || m != orig) {
		fprintf(stderr, "child: evproxy_send_send to an inherited "
			"evproxy gave %d, expected ECANCELED\n", ret);
		return 35;
	}
	talloc_free(m);
	talloc_free(mem);
	/*
	 * Free what the child inherited: the loop of a thread that does not
	 * exist here. That must not disturb the parent, which checks its
	 * loop still works after the child exited.
	 */
	talloc_free(inherited.ev);
	evproxy_sender_unref(inherited.s);
	evproxy_ringer_unref(inherited.r);
	return 0;
}

#ifdef __SANITIZE_THREAD__
/*
 * ThreadSanitizer does not support threads started in a child of a
 * multi-threaded parent ("dup thread with used id"): there the child's
 * fresh loop gets its messages and rings from its own thread.
 */
static int child_own_loops(const char *spec, uint64_t n)
{
	struct consumer c;
	struct tevent_context *ev = tu_context_try(NULL, spec);
	struct evproxy *p;
	struct evproxy_doorbell *db;
	struct evproxy_sender *s;
	uint64_t i;
	int ret = 0;

	memset(&c, 0, sizeof(c));
	if (ev == NULL) {
		return 40;
	}
	p = evproxy_create(ev, ev, NULL);
	db = evproxy_add_doorbell(ev, ev, consumer_ring, &c);
	s = evproxy_sender(p);
	if (p == NULL || db == NULL || s == NULL) {
		return 41;
	}
	for (i = 0; i < n; i++) {
		struct smsg *m = smsg_new(0, 0, i);

		if (m == NULL || evproxy_send(s, consumer_msg, &c, &m) != 0 ||
		    evproxy_ring_doorbell(db) != 0) {
			talloc_free(m);
			ret = 42;
			break;
		}
	}
	while (ret == 0 && (c.delivered < n || c.rings < n)) {
		if (tevent_loop_once(ev) != 0) {
			ret = 43;
		}
	}
	if (ret == 0 && (c.delivered != n || c.rings != n || c.bad != 0 ||
			 c.out_of_order != 0 || c.next_seq[0] != n)) {
		ret = 44;
	}
	evproxy_sender_unref(s);
	talloc_free(ev);
	return ret;
}
#else
/* Child: a consumer thread and the child's main thread as producer. */
static int child_own_loops(const char *spec, uint64_t n)
{
	struct consumer c;
	uint64_t i;

	memset(&c, 0, sizeof(c));
	c.spec = spec;
	c.expect_msgs = n;
	c.expect_rings = n;
	if (pthread_create(&c.thread, NULL, consumer_thread, &c) != 0) {
		return 40;
	}
	while (!atomic_load_explicit(&c.ready, memory_order_acquire)) {
		sched_yield();
	}
	if (atomic_load(&c.failed_setup)) {
		pthread_join(c.thread, NULL);
		return 41;
	}
	for (i = 0; i < n; i++) {
		struct smsg *m = smsg_new(0, 0, i);

		if (m == NULL || evproxy_send(c.s, consumer_msg, &c, &m) != 0 ||
		    evproxy_ringer_ring(c.r) != 0) {
			talloc_free(m);
			break;
		}
	}
	atomic_store(&c.producers_done, true);
	pthread_join(c.thread, NULL);
	evproxy_sender_unref(c.s);
	evproxy_ringer_unref(c.r);
	if (i != n) {
		return 42;
	}
	if (c.delivered != n || c.after_delivered != n || c.bad != 0 ||
	    c.out_of_order != 0 || c.next_seq[0] != n) {
		return 43;
	}
	if (c.rings != n || c.after_rings != n || c.dstats.rings != n) {
		return 44;
	}
	return 0;
}
#endif

/* Parent: @p n messages and rings from this thread to @p c. */
static void parent_send(struct consumer *c, uint64_t first, uint64_t n)
{
	uint64_t i;

	for (i = first; i < first + n; i++) {
		struct smsg *m = smsg_new(0, 0, i);

		assert_non_null(m);
		assert_int_equal(evproxy_send(c->s, consumer_msg, c, &m), 0);
		assert_null(m);
		assert_int_equal(evproxy_ringer_ring(c->r), 0);
	}
}

/*
 * fork() while the parent's consumer thread runs its loop (and has
 * messages and rings in flight). In the child: the inherited sender and
 * ringer give ECANCELED (also through evproxy_send_send()), and fresh
 * loops work, with exact counts, between two threads of the child. In the
 * parent, after the child exited: the loop keeps working and got exactly
 * the parent's messages and rings, in order.
 */
static void test_fork(void **state)
{
	static const char *const specs[] = {
		"epoll", "evpoll-auto", "evpoll-always", NULL,
	};
	const char *const *spec;
	uint64_t n = tu_scale(20000);

	for (spec = specs; *spec != NULL; spec++) {
		struct consumer c;
		uint64_t msgs = 3 * n, rings = 3 * n + 1;
		int status;
		pid_t pid;

		consumers_start(&c, 1, *spec, &msgs, &rings);
		parent_send(&c, 0, n);
		inherited.s = c.s;
		inherited.r = c.r;
		/*
		 * The consumer thread runs its loop, with messages and rings
		 * in flight, but the fork happens between two iterations
		 * (the ring wakes it up to see the pause), so that the child
		 * can free what it inherited: it must free everything before
		 * it exits for valgrind's leak check, and the holder of a
		 * message being delivered, or an fd event whose handler
		 * runs, cannot be freed from the child.
		 */
		atomic_store(&c.pause, true);
		assert_int_equal(evproxy_ringer_ring(c.r), 0);
		while (!atomic_load(&c.paused)) {
			sched_yield();
		}
		parent_send(&c, n, n / 2);
		inherited.ev = c.ev;
		pid = fork();
		assert_int_not_equal(pid, -1);
		if (pid == 0) {
			int code = child_inherited_checks();

			if (code == 0) {
				code = child_own_loops(*spec, n);
			}
			if (code == 0 && tu_check_failures() != 0) {
				code = 50;
			}
			_exit(code);
		}
		atomic_store(&c.pause, false);
		/* the parent keeps going while the child works */
		parent_send(&c, n + n / 2, n - n / 2);
		assert_int_equal(waitpid(pid, &status, 0), pid);
		/* and after the child is gone */
		parent_send(&c, 2 * n, n);
		atomic_store(&c.producers_done, true);
		assert_int_equal(pthread_join(c.thread, NULL), 0);
		evproxy_sender_unref(c.s);
		evproxy_ringer_unref(c.r);
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			fail_msg("[%s] the child failed (status 0x%x)", *spec,
				 status);
		}
		tu_checks_assert();
		CHECK_U64(c.bad, 0);
		CHECK_U64(c.out_of_order, 0);
		CHECK_U64(c.delivered, msgs);
		CHECK_U64(c.after_delivered, msgs);
		CHECK_U64(c.next_seq[0], msgs);
		CHECK_U64(c.rings, rings);
		CHECK_U64(c.after_rings, rings);
		CHECK_U64(c.pstats.discarded, 0);
	}
}

/*
 * A child that keeps running the loop it inherited (tevent supports that,
 * Samba's forked children do it) while messages the parent's threads sent
 * are still queued: the inherited evproxy is dead in the child, so they
 * must not be delivered there (they are the parent's, and the parent
 * delivers them: delivering in the child too would deliver them twice).
 * test_doorbell.c checks the same for doorbells.
 */
struct fork_count {
	uint64_t delivered;
	uint64_t target;
	bool done;
};

static void fork_count_msg(struct tevent_context *ev, void *msg,
			   void *private_data)
{
	struct fork_count *fc = private_data;

	fc->delivered++;
	if (fc->delivered >= fc->target) {
		fc->done = true;
	}
}

static void test_fork_child_runs_inherited_loop(void **state)
{
	static const char *const specs[] = {
		"epoll", "evpoll-auto", "evpoll-always", NULL,
	};
	const char *const *spec;
	char problems[1024] = "";

	for (spec = specs; *spec != NULL; spec++) {
		struct tevent_context *ev = tu_context(NULL, *spec);
		struct evproxy *p = evproxy_create(ev, ev, NULL);
		struct evproxy_sender *s = evproxy_sender(p);
		struct fork_count fc = { .target = 3 };
		unsigned i;
		int status;
		pid_t pid;

		assert_non_null(s);
		/* evpoll: get the loop spinning first, then queue */
		if (evpoll_is_evpoll(ev)) {
			evpoll_activity(ev);
			for (i = 0; i < 1000 && !evpoll_is_spinning(ev);
			     i++) {
				assert_int_equal(tevent_loop_once(ev), 0);
			}
			assert_true(evpoll_is_spinning(ev));
		}
		for (i = 0; i < 3; i++) {
			struct smsg *m = smsg_new(0, 0, i);

			assert_int_equal(evproxy_send(s, fork_count_msg, &fc,
						      &m), 0);
		}
		pid = fork();
		assert_int_not_equal(pid, -1);
		if (pid == 0) {
			uint64_t seen;

			run_for(ev, 20);
			seen = fc.delivered;
			/* the rest for valgrind's leak check at exit */
			evproxy_sender_unref(s);
			talloc_free(ev);
			_exit(seen == 0 ? 0 : 1);
		}
		assert_int_equal(waitpid(pid, &status, 0), pid);
		assert_true(WIFEXITED(status));
		if (WEXITSTATUS(status) == 1) {
			snprintf(problems + strlen(problems),
				 sizeof(problems) - strlen(problems),
				 "\n  %s: the child delivered the parent's "
				 "queued messages", *spec);
		} else {
			assert_int_equal(WEXITSTATUS(status), 0);
		}
		/* the parent delivers them, once */
		tu_loop_until(ev, &fc.done, 60000);
		assert_int_equal(run_for(ev, 2), 0);
		CHECK_U64(fc.delivered, 3);
		evproxy_sender_unref(s);
		talloc_free(ev);
	}
	if (problems[0] != '\0') {
		fail_msg("inherited evproxy in a forked child:%s", problems);
	}
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
		T(test_stress_evpoll_auto),
		T(test_stress_evpoll_always),
		T(test_stress_epoll),
		T(test_lifetime),
		T(test_fork),
		T(test_fork_child_runs_inherited_loop),
#undef T
	};

	/* threads allocate top-level talloc chunks (messages) */
	talloc_disable_null_tracking();
	/*
	 * tevent's one-time backend set-up, done here, under evpoll's lock:
	 * tevent's own is not safe for threads that create their first
	 * contexts at the same time (the consumer threads do).
	 */
	if (!evpoll_init()) {
		fprintf(stderr, "evpoll_init failed\n");
		return 1;
	}
	if (argc > 1) {
		/* run only the tests matching a pattern, e.g. 'test_fork*' */
		cmocka_set_test_filter(argv[1]);
	}
	return cmocka_run_group_tests(tests, NULL, NULL);
}
