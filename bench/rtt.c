/*
 * evproxy-bench: round trips between two threads.
 *
 * Thread A (the bench thread) sends a ping, thread B answers with a pong,
 * A times each round trip. Every mechanism runs the same count.
 */
#include <errno.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "bench.h"
#include "evpoll.h"
#include "evproxy.h"

static uint64_t rtt_count(void)
{
	return bench_count(200, 20000, 200000);
}

static uint64_t *samples_new(uint64_t n)
{
	uint64_t *s = calloc(n, sizeof(*s));

	if (s == NULL) {
		perror("calloc");
		exit(1);
	}
	return s;
}

static void finish(struct bench_result *r, uint64_t *s, uint64_t n)
{
	bench_percentiles(s, n, r);
	free(s);
	bench_add(r);
}

/* ---- floor: two threads spinning on one cache line ---------------------- */

static struct {
	alignas(64) atomic_uint_fast64_t seq;
} line;

static void *floor_responder(void *arg)
{
	uint64_t n = *(uint64_t *)arg;
	uint64_t i;

	for (i = 0; i < n; i++) {
		uint_fast64_t want = 2 * i + 1;

		while (atomic_load_explicit(&line.seq, memory_order_acquire) !=
		       want) {
			bench_relax();
		}
		atomic_store_explicit(&line.seq, want + 1,
				      memory_order_release);
	}
	return NULL;
}

static void rtt_floor(void)
{
	struct bench_result r = {
		.name = "floor_spin_rtt", .unit = "ns",
		.goal = "the hardware floor",
	};
	uint64_t n = rtt_count(), i, *s = samples_new(n);
	pthread_t t;

	atomic_store(&line.seq, 0);
	bench_thread_start(&t, 1, floor_responder, &n);
	for (i = 0; i < n; i++) {
		uint64_t t0 = bench_now_ns();

		atomic_store_explicit(&line.seq, 2 * i + 1,
				      memory_order_release);
		while (atomic_load_explicit(&line.seq, memory_order_acquire) !=
		       2 * i + 2) {
			bench_relax();
		}
		s[i] = bench_now_ns() - t0;
	}
	pthread_join(t, NULL);
	finish(&r, s, n);
}

/* ---- raw eventfd + epoll_wait, no tevent --------------------------------- */

struct efd_side {
	int efd, ep;
};

static struct efd_side efd_side_new(void)
{
	struct efd_side s;
	struct epoll_event e = { .events = EPOLLIN };

	s.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	s.ep = epoll_create1(EPOLL_CLOEXEC);
	if (s.efd == -1 || s.ep == -1 ||
	    epoll_ctl(s.ep, EPOLL_CTL_ADD, s.efd, &e) != 0) {
		perror("eventfd/epoll");
		exit(1);
	}
	return s;
}

static void efd_wait(struct efd_side *s)
{
	struct epoll_event e;
	uint64_t v;

	while (epoll_wait(s->ep, &e, 1, -1) != 1) {
	}
	if (read(s->efd, &v, sizeof(v)) != sizeof(v)) {
		abort();
	}
}

static void efd_kick(struct efd_side *s)
{
	uint64_t one = 1;

	if (write(s->efd, &one, sizeof(one)) != sizeof(one)) {
		abort();
	}
}

static struct efd_side efd_a, efd_b;

static void *efd_responder(void *arg)
{
	uint64_t n = *(uint64_t *)arg, i;

	for (i = 0; i < n; i++) {
		efd_wait(&efd_b);
		efd_kick(&efd_a);
	}
	return NULL;
}

static void rtt_eventfd(void)
{
	struct bench_result r = {
		.name = "eventfd_epoll_rtt", .unit = "ns",
		.baseline = "floor_spin_rtt",
	};
	uint64_t n = rtt_count(), i, *s = samples_new(n);
	pthread_t t;

	efd_a = efd_side_new();
	efd_b = efd_side_new();
	bench_thread_start(&t, 1, efd_responder, &n);
	for (i = 0; i < n; i++) {
		uint64_t t0 = bench_now_ns();

		efd_kick(&efd_b);
		efd_wait(&efd_a);
		s[i] = bench_now_ns() - t0;
	}
	pthread_join(t, NULL);
	close(efd_a.efd);
	close(efd_a.ep);
	close(efd_b.efd);
	close(efd_b.ep);
	finish(&r, s, n);
}

/* ---- tevent-based ping-pongs share one shape ------------------------------ */

/*
 * B runs its own loop until 'stop'; A runs its loop until 'pong'. A
 * mechanism provides: setup on each side, send to B, send to A.
 */
struct tpp {
	const char *backend_a, *backend_b;
	struct evpoll_config cfg;
	struct tevent_context *ev_a, *ev_b;
	atomic_bool b_ready;
	atomic_bool stopping;	/* A -> B: the next ping is the last */
	atomic_bool a_done;	/* A returned from its last send */
	bool b_done;		/* B only: the last ping arrived */
	bool pong;

	void (*setup_b)(struct tpp *p);	/* on B, after ev_b exists */
	void (*setup_a)(struct tpp *p);	/* on A */
	void (*to_b)(struct tpp *p);	/* from A */
	void (*teardown_b)(struct tpp *p);	/* on B, before ev_b goes */
	void (*teardown_a)(struct tpp *p);	/* on A, after B is joined */

	/* mechanism state */
	struct tevent_threaded_context *tctx_a, *tctx_b;
	/*
	 * tevent aborts if an immediate is rescheduled while its handler
	 * still runs on the other thread: alternate two per direction.
	 */
	struct tevent_immediate *im_a[2], *im_b[2];
	unsigned seq_a, seq_b;
	struct tevent_thread_proxy *tp_a, *tp_b;
	struct evproxy_doorbell *db_a, *db_b;
	struct evproxy_ringer *r_a, *r_b;
};

static struct tevent_context *tpp_context(struct tpp *p, const char *backend)
{
	struct tevent_context *ev;

	if (strcmp(backend, "evpoll") == 0) {
		ev = evpoll_context_init(NULL, &p->cfg);
	} else {
		ev = tevent_context_init_byname(NULL, backend);
	}
	if (ev == NULL) {
		fprintf(stderr, "cannot create a %s context\n", backend);
		exit(1);
	}
	return ev;
}

static void *tpp_responder(void *arg)
{
	struct tpp *p = arg;

	p->ev_b = tpp_context(p, p->backend_b);
	p->setup_b(p);
	atomic_store(&p->b_ready, true);
	while (!p->b_done) {
		tevent_loop_once(p->ev_b);
	}
	/*
	 * tevent's senders touch the destination's wake-up fd after they
	 * queued the message: wait until A is out of its last send call.
	 */
	while (!atomic_load(&p->a_done)) {
		bench_relax();
	}
	if (p->teardown_b != NULL) {
		p->teardown_b(p);
	}
	talloc_free(p->ev_b);
	return NULL;
}

static void tpp_run(struct tpp *p, struct bench_result *r)
{
	uint64_t n = rtt_count(), i, *s = samples_new(n);
	pthread_t t;

	p->ev_a = tpp_context(p, p->backend_a);
	bench_thread_start(&t, 1, tpp_responder, p);
	while (!atomic_load(&p->b_ready)) {
		bench_relax();
	}
	p->setup_a(p);
	for (i = 0; i < n; i++) {
		uint64_t t0 = bench_now_ns();

		p->pong = false;
		p->to_b(p);
		while (!p->pong) {
			tevent_loop_once(p->ev_a);
		}
		s[i] = bench_now_ns() - t0;
	}
	/* a last ping, which B does not answer, ends B's loop */
	atomic_store(&p->stopping, true);
	p->to_b(p);
	atomic_store(&p->a_done, true);
	pthread_join(t, NULL);
	if (p->teardown_a != NULL) {
		p->teardown_a(p);
	}
	talloc_free(p->ev_a);
	finish(r, s, n);
}

/* On B: true if this ping is the last one (then do not answer). */
static bool tpp_last(struct tpp *p)
{
	if (atomic_load(&p->stopping)) {
		p->b_done = true;
		return true;
	}
	return false;
}

/* tevent_threaded_schedule_immediate */

static void thr_at_a(struct tevent_context *ev, struct tevent_immediate *im,
		     void *private_data)
{
	struct tpp *p = private_data;

	p->pong = true;
}

static void thr_at_b(struct tevent_context *ev, struct tevent_immediate *im,
		     void *private_data)
{
	struct tpp *p = private_data;

	if (tpp_last(p)) {
		return;
	}
	tevent_threaded_schedule_immediate(p->tctx_a, p->im_a[p->seq_a++ & 1],
					   thr_at_a, p);
}

static void thr_setup_b(struct tpp *p)
{
	p->tctx_b = tevent_threaded_context_create(p->ev_b, p->ev_b);
	p->im_a[0] = tevent_create_immediate(p->ev_b);
	p->im_a[1] = tevent_create_immediate(p->ev_b);
}

static void thr_setup_a(struct tpp *p)
{
	p->tctx_a = tevent_threaded_context_create(p->ev_a, p->ev_a);
	p->im_b[0] = tevent_create_immediate(p->ev_a);
	p->im_b[1] = tevent_create_immediate(p->ev_a);
}

static void thr_to_b(struct tpp *p)
{
	tevent_threaded_schedule_immediate(p->tctx_b, p->im_b[p->seq_b++ & 1],
					   thr_at_b, p);
}

static void rtt_tevent_threaded(void)
{
	struct tpp p = {
		.backend_a = "epoll", .backend_b = "epoll",
		.setup_a = thr_setup_a, .setup_b = thr_setup_b,
		.to_b = thr_to_b,
	};
	struct bench_result r = {
		.name = "tevent_threaded_rtt", .unit = "ns",
		.baseline = "eventfd_epoll_rtt",
	};

	tpp_run(&p, &r);
}

/* tevent_thread_proxy_schedule: an immediate allocated per message */

static void proxy_at_a(struct tevent_context *ev, struct tevent_immediate *im,
		       void *private_data)
{
	/* private_data is the talloc'd pointer we sent; tevent frees it */
	struct tpp *p = *(struct tpp **)private_data;

	p->pong = true;
}

static void proxy_send(struct tevent_thread_proxy *tp, struct tpp *p,
		       tevent_immediate_handler_t fn)
{
	struct tevent_immediate *im = tevent_create_immediate(NULL);
	struct tpp **msg = talloc(NULL, struct tpp *);

	if (im == NULL || msg == NULL) {
		abort();
	}
	*msg = p;
	tevent_thread_proxy_schedule(tp, &im, fn, &msg);
}

static void proxy_at_b(struct tevent_context *ev, struct tevent_immediate *im,
		       void *private_data)
{
	struct tpp *p = *(struct tpp **)private_data;

	if (tpp_last(p)) {
		return;
	}
	proxy_send(p->tp_a, p, proxy_at_a);
}

static void proxy_setup_b(struct tpp *p)
{
	p->tp_b = tevent_thread_proxy_create(p->ev_b);
}

static void proxy_setup_a(struct tpp *p)
{
	p->tp_a = tevent_thread_proxy_create(p->ev_a);
}

static void proxy_to_b(struct tpp *p)
{
	proxy_send(p->tp_b, p, proxy_at_b);
}

static void rtt_tevent_proxy(void)
{
	struct tpp p = {
		.backend_a = "epoll", .backend_b = "epoll",
		.setup_a = proxy_setup_a, .setup_b = proxy_setup_b,
		.to_b = proxy_to_b,
	};
	struct bench_result r = {
		.name = "tevent_proxy_rtt", .unit = "ns",
		.baseline = "eventfd_epoll_rtt",
	};

	tpp_run(&p, &r);
}

/* evproxy doorbells */

static void db_at_a(struct tevent_context *ev, struct evproxy_doorbell *db,
		    uint64_t rings, void *private_data)
{
	struct tpp *p = private_data;

	p->pong = true;
}

static void db_at_b(struct tevent_context *ev, struct evproxy_doorbell *db,
		    uint64_t rings, void *private_data)
{
	struct tpp *p = private_data;

	if (tpp_last(p)) {
		return;
	}
	evproxy_ringer_ring(p->r_a);
}

static void db_setup_b(struct tpp *p)
{
	p->db_b = evproxy_add_doorbell(p->ev_b, p->ev_b, db_at_b, p);
	p->r_b = evproxy_doorbell_ringer(p->db_b);
}

static void db_setup_a(struct tpp *p)
{
	p->db_a = evproxy_add_doorbell(p->ev_a, p->ev_a, db_at_a, p);
	p->r_a = evproxy_doorbell_ringer(p->db_a);
	if (p->db_a == NULL || p->r_b == NULL) {
		fprintf(stderr, "doorbell setup failed\n");
		exit(1);
	}
}

static void db_to_b(struct tpp *p)
{
	evproxy_ringer_ring(p->r_b);
}

/* each side drops the reference of the ringer it rang with */
static void db_teardown_b(struct tpp *p)
{
	evproxy_ringer_unref(p->r_a);
}

static void db_teardown_a(struct tpp *p)
{
	evproxy_ringer_unref(p->r_b);
}

static void rtt_doorbell(const char *name, const char *backend,
			 enum evpoll_mode mode, const char *baseline,
			 const char *goal)
{
	struct tpp p = {
		.backend_a = backend, .backend_b = backend,
		.setup_a = db_setup_a, .setup_b = db_setup_b,
		.to_b = db_to_b, .teardown_b = db_teardown_b,
		.teardown_a = db_teardown_a,
	};
	struct bench_result r = {
		.name = name, .unit = "ns", .baseline = baseline,
		.goal = goal,
	};

	evpoll_config_default(&p.cfg);
	p.cfg.mode = mode;
	tpp_run(&p, &r);
}

void bench_rtt(void)
{
	rtt_floor();
	rtt_eventfd();
	rtt_tevent_threaded();
	rtt_tevent_proxy();
	rtt_doorbell("doorbell_epoll_rtt", "epoll", EVPOLL_MODE_NEVER,
		     "eventfd_epoll_rtt", "<= 1.10x");
	rtt_doorbell("doorbell_evpoll_rtt", "evpoll", EVPOLL_MODE_ALWAYS,
		     "floor_spin_rtt", "<= 2x");
}
