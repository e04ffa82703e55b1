/*
 * evproxy-bench: the cost of a coalesced ring, idle CPU after traffic, and
 * the overhead of evpoll's NEVER mode over the stock epoll backend.
 */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "evpoll.h"
#include "evproxy.h"

/* ---- ring_coalesced_ns ------------------------------------------------------ */

static void noop_handler(struct tevent_context *ev,
			 struct evproxy_doorbell *db, uint64_t rings,
			 void *private_data)
{
}

static void ring_coalesced(void)
{
	struct bench_result r = {
		.name = "ring_coalesced_ns", .unit = "ns",
		.goal = "<= 20 ns",
	};
	struct tevent_context *ev = tevent_context_init_byname(NULL, "epoll");
	struct evproxy_doorbell *db;
	uint64_t k = bench_count(100000, 10000000, 50000000), i;
	double v[16];
	unsigned rep, reps = bench_repeats();

	db = evproxy_add_doorbell(ev, ev, noop_handler, NULL);
	if (db == NULL) {
		abort();
	}
	evproxy_ring_doorbell(db);	/* now pending: later rings coalesce */
	for (rep = 0; rep < reps; rep++) {
		uint64_t t0 = bench_now_ns();

		for (i = 0; i < k; i++) {
			evproxy_ring_doorbell(db);
		}
		v[rep] = (double)(bench_now_ns() - t0) / (double)k;
	}
	r.value = bench_median(v, reps);
	talloc_free(ev);
	bench_add(&r);
}

/* ---- idle_cpu_pct ----------------------------------------------------------- */

struct idle {
	struct tevent_context *ev;
	struct evproxy_ringer *r;
	atomic_bool ready;
	atomic_uint_fast64_t handled;
	atomic_bool stop;
};

static void idle_handler(struct tevent_context *ev,
			 struct evproxy_doorbell *db, uint64_t rings,
			 void *private_data)
{
	struct idle *s = private_data;

	atomic_fetch_add(&s->handled, rings);
}

static void *idle_loop(void *arg)
{
	struct idle *s = arg;
	struct evproxy_doorbell *db;

	s->ev = evpoll_context_init(NULL, NULL);
	db = evproxy_add_doorbell(s->ev, s->ev, idle_handler, s);
	if (db == NULL) {
		abort();
	}
	s->r = evproxy_doorbell_ringer(db);
	atomic_store(&s->ready, true);
	while (!atomic_load(&s->stop)) {
		tevent_loop_once(s->ev);
	}
	talloc_free(s->ev);
	return NULL;
}

static uint64_t thread_cpu_ns(pthread_t t)
{
	clockid_t cid;
	struct timespec ts;

	if (pthread_getcpuclockid(t, &cid) != 0 ||
	    clock_gettime(cid, &ts) != 0) {
		return 0;
	}
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void idle_cpu(void)
{
	struct bench_result r = {
		.name = "idle_cpu_pct", .unit = "%", .goal = "< 1 %",
	};
	struct idle s = { .ready = false };
	uint64_t traffic_ns = bench_count(20, 200, 500) * 1000000ULL;
	uint64_t idle_ns = bench_count(100, 1000, 1000) * 1000000ULL;
	uint64_t t0, c0, end;
	pthread_t t;
	struct timespec ts;

	bench_thread_start(&t, 1, idle_loop, &s);
	while (!atomic_load(&s.ready)) {
		bench_relax();
	}
	/* traffic: rings as fast as they are handled, for traffic_ns */
	end = bench_now_ns() + traffic_ns;
	while (bench_now_ns() < end) {
		uint64_t before = atomic_load(&s.handled);

		evproxy_ringer_ring(s.r);
		while (atomic_load(&s.handled) == before) {
			bench_relax();
		}
	}
	/* the second after the traffic stopped */
	t0 = bench_now_ns();
	c0 = thread_cpu_ns(t);
	ts.tv_sec = (time_t)(idle_ns / 1000000000ULL);
	ts.tv_nsec = (long)(idle_ns % 1000000000ULL);
	nanosleep(&ts, NULL);
	r.value = 100.0 * (double)(thread_cpu_ns(t) - c0) /
		  (double)(bench_now_ns() - t0);

	atomic_store(&s.stop, true);
	evproxy_ringer_ring(s.r);
	pthread_join(t, NULL);
	evproxy_ringer_unref(s.r);
	bench_add(&r);
}

/* ---- evpoll_never_overhead: fd ping-pong, evpoll NEVER / stock epoll ------- */

struct fdpp {
	bool evpoll;
	int ab[2], ba[2];	/* pipes: A writes ab[1], B writes ba[1] */
	struct tevent_context *ev_b;
	atomic_bool ready;
	bool b_done;
	bool pong;
};

static struct tevent_context *fdpp_context(bool use_evpoll)
{
	struct evpoll_config cfg;
	struct tevent_context *ev;

	if (use_evpoll) {
		evpoll_config_default(&cfg);
		cfg.mode = EVPOLL_MODE_NEVER;
		ev = evpoll_context_init(NULL, &cfg);
	} else {
		ev = tevent_context_init_byname(NULL, "epoll");
	}
	if (ev == NULL) {
		abort();
	}
	return ev;
}

static void fdpp_at_b(struct tevent_context *ev, struct tevent_fd *fde,
		      uint16_t flags, void *private_data)
{
	struct fdpp *p = private_data;
	char c;

	if (read(p->ab[0], &c, 1) != 1) {
		return;
	}
	if (c == 'q') {
		p->b_done = true;
		return;
	}
	if (write(p->ba[1], &c, 1) != 1) {
		abort();
	}
}

static void fdpp_at_a(struct tevent_context *ev, struct tevent_fd *fde,
		      uint16_t flags, void *private_data)
{
	struct fdpp *p = private_data;
	char c;

	if (read(p->ba[0], &c, 1) == 1) {
		p->pong = true;
	}
}

/*
 * Both threads of this row run on one CPU: a wake-up is then a local
 * context switch, whose cost is stable, instead of waking a halted vCPU,
 * whose cost varies several-fold from one second to the next on a VM and
 * would drown the few hundred nanoseconds being compared.
 */
static void pin_cpu0(void)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(0, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

static void *fdpp_responder(void *arg)
{
	struct fdpp *p = arg;

	pin_cpu0();
	p->ev_b = fdpp_context(p->evpoll);
	tevent_add_fd(p->ev_b, p->ev_b, p->ab[0], TEVENT_FD_READ, fdpp_at_b,
		      p);
	atomic_store(&p->ready, true);
	while (!p->b_done) {
		tevent_loop_once(p->ev_b);
	}
	talloc_free(p->ev_b);
	return NULL;
}

/* median round trip in ns of one fd ping-pong run */
static double fdpp_run(bool use_evpoll, uint64_t n)
{
	struct fdpp p = { .evpoll = use_evpoll };
	struct tevent_context *ev_a;
	struct bench_result tmp = { .name = "tmp" };
	uint64_t *s = calloc(n, sizeof(*s)), i;
	cpu_set_t saved;
	pthread_t t;

	if (s == NULL || pipe(p.ab) != 0 || pipe(p.ba) != 0) {
		abort();
	}
	sched_getaffinity(0, sizeof(saved), &saved);
	pin_cpu0();
	ev_a = fdpp_context(use_evpoll);
	tevent_add_fd(ev_a, ev_a, p.ba[0], TEVENT_FD_READ, fdpp_at_a, &p);
	bench_thread_start(&t, 1, fdpp_responder, &p);
	while (!atomic_load(&p.ready)) {
		bench_relax();
	}
	for (i = 0; i < n; i++) {
		uint64_t t0 = bench_now_ns();

		p.pong = false;
		if (write(p.ab[1], "p", 1) != 1) {
			abort();
		}
		while (!p.pong) {
			tevent_loop_once(ev_a);
		}
		s[i] = bench_now_ns() - t0;
	}
	if (write(p.ab[1], "q", 1) != 1) {
		abort();
	}
	pthread_join(t, NULL);
	talloc_free(ev_a);
	close(p.ab[0]);
	close(p.ab[1]);
	close(p.ba[0]);
	close(p.ba[1]);
	sched_setaffinity(0, sizeof(saved), &saved);
	bench_percentiles(s, n, &tmp);
	free(s);
	return tmp.p50;
}

static void never_overhead(void)
{
	struct bench_result r = {
		.name = "evpoll_never_overhead", .unit = "ratio",
		.goal = "<= 1.05",
	};
	unsigned rounds = (unsigned)bench_count(1, 5, 9), i;
	uint64_t n = bench_count(100, 4000, 20000);
	double epoll_v[16], never_v[16];

	/* interleaved, so both see the same machine noise */
	for (i = 0; i < rounds; i++) {
		epoll_v[i] = fdpp_run(false, n);
		never_v[i] = fdpp_run(true, n);
	}
	r.value = bench_median(never_v, rounds) /
		  bench_median(epoll_v, rounds);
	bench_add(&r);
}

void bench_misc(void)
{
	ring_coalesced();
	idle_cpu();
	never_overhead();
}
