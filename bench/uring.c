/*
 * evproxy-bench: io_uring completions delivered to a tevent handler.
 *
 *   uring_nop_evpoll_spin  evpoll_uring adapter, evpoll loop in ALWAYS mode:
 *                          the poll callback reaps the CQ, eventfd muted
 *   uring_nop_eventfd      evpoll_uring adapter on a stock epoll loop: the
 *                          eventfd registered on the ring, a tevent_fd on it
 *   uring_nop_samba_fd     Samba's vfs_io_uring pattern, the baseline: the
 *                          ring fd itself in tevent_add_fd() on a stock
 *                          epoll loop, CQEs reaped in its handler with
 *                          io_uring_for_each_cqe() + io_uring_cq_advance()
 *
 * What is measured, and why it is fair: every row runs the same workload on
 * the loop thread. NOPS NOPs in all, URING_QD in flight: each completion's
 * handler prepares the next NOP, and one tevent immediate per delivery
 * batch submits everything prepared (io_uring_submit(), one syscall per
 * batch, the same in every row). A NOP completes inside io_uring_submit(),
 * so its CQE is in the queue when the syscall returns and the loop never
 * sleeps: the rows differ only in how a CQE already in the ring reaches
 * the handler. Spin: a load of the CQ tail per loop pass, no syscall, and
 * the kernel skips the eventfd (muted). Eventfd: the kernel signals the
 * eventfd on every submit, then one epoll_wait() and one read() per batch.
 * Samba: one epoll_wait() per batch (the ring fd's poll). So these rows
 * measure delivery overhead per CQE at a fixed submission cost, not I/O
 * throughput and not wake-up latency (the rtt rows measure that). Rows are
 * interleaved per repetition, so all see the same machine noise; the
 * median of bench_repeats() runs is reported.
 */
#include <stdio.h>
#include <stdlib.h>

#include "bench.h"
#include "evpoll.h"
#include "evpoll_uring.h"


#define URING_QD 32U

enum variant { V_SPIN, V_EVENTFD, V_SAMBA, V_COUNT };

struct nop_run {
	struct io_uring ring;
	struct tevent_context *ev;
	struct evpoll_uring *u;		/* NULL for V_SAMBA */
	struct tevent_immediate *im;
	uint64_t n;
	uint64_t prepared;
	uint64_t completed;
	bool submit_pending;
	bool failed;
};

static void submit_handler(struct tevent_context *ev,
			   struct tevent_immediate *im, void *private_data)
{
	struct nop_run *r = private_data;
	int ret;

	r->submit_pending = false;
	if (r->u != NULL) {
		ret = evpoll_uring_submit(r->u);
	} else {
		ret = io_uring_submit(&r->ring);
	}
	if (ret < 0) {
		r->failed = true;
	}
}

static void prepare(struct nop_run *r)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

	if (sqe == NULL) {
		r->failed = true;
		return;
	}
	io_uring_prep_nop(sqe);
	sqe->user_data = r->prepared++;
	if (!r->submit_pending) {
		r->submit_pending = true;
		tevent_schedule_immediate(r->im, r->ev, submit_handler, r);
	}
}

/* The per-CQE work, the same in every row. */
static void one_cqe(struct nop_run *r, const struct io_uring_cqe *cqe)
{
	if (cqe->res != 0) {
		r->failed = true;
	}
	r->completed++;
	if (r->prepared < r->n) {
		prepare(r);
	}
}

static void adapter_handler(struct tevent_context *ev,
			    struct io_uring_cqe *cqe, void *private_data)
{
	one_cqe(private_data, cqe);
}

/* Samba's vfs_io_uring: reap everything in the ring fd's handler. */
static void ring_fd_handler(struct tevent_context *ev, struct tevent_fd *fde,
			    uint16_t flags, void *private_data)
{
	struct nop_run *r = private_data;
	struct io_uring_cqe *cqe;
	unsigned head, nr = 0;

	io_uring_for_each_cqe(&r->ring, head, cqe) {
		one_cqe(r, cqe);
		nr++;
	}
	io_uring_cq_advance(&r->ring, nr);
}

static struct tevent_context *variant_context(enum variant v)
{
	struct evpoll_config cfg;

	if (v != V_SPIN) {
		return tevent_context_init_byname(NULL, "epoll");
	}
	evpoll_config_default(&cfg);
	cfg.mode = EVPOLL_MODE_ALWAYS;
	return evpoll_context_init(NULL, &cfg);
}

/* CQEs per second of one run */
static double nop_run(enum variant v, uint64_t n)
{
	struct nop_run r = { .n = n };
	uint64_t t0, t1;
	unsigned i;

	if (io_uring_queue_init(2 * URING_QD, &r.ring, 0) != 0) {
		fprintf(stderr, "bench_uring: io_uring_queue_init failed\n");
		exit(1);
	}
	r.ev = variant_context(v);
	if (r.ev == NULL) {
		abort();
	}
	r.im = tevent_create_immediate(r.ev);
	if (v == V_SAMBA) {
		if (tevent_add_fd(r.ev, r.ev, r.ring.ring_fd, TEVENT_FD_READ,
				  ring_fd_handler, &r) == NULL) {
			abort();
		}
	} else {
		r.u = evpoll_uring_attach(r.ev, r.ev, &r.ring,
					  adapter_handler, &r);
		if (r.u == NULL) {
			perror("evpoll_uring_attach");
			exit(1);
		}
	}
	if (r.im == NULL) {
		abort();
	}
	/* settle: handle the adapter's attach-time eventfd signal */
	while (r.u != NULL) {
		struct evpoll_uring_stats st;

		evpoll_uring_get_stats(r.u, &st);
		if (st.eventfd_wakeups > 0) {
			break;
		}
		tevent_loop_once(r.ev);
	}

	t0 = bench_now_ns();
	for (i = 0; i < URING_QD && r.prepared < r.n; i++) {
		prepare(&r);
	}
	while (r.completed < r.n && !r.failed) {
		if (tevent_loop_once(r.ev) != 0) {
			r.failed = true;
		}
	}
	t1 = bench_now_ns();
	if (r.failed) {
		fprintf(stderr, "bench_uring: run failed\n");
		exit(1);
	}
	talloc_free(r.ev);	/* the adapter and the immediate with it */
	io_uring_queue_exit(&r.ring);
	return (double)n * 1e9 / (double)(t1 - t0);
}

void bench_uring(void)
{
	static const char *const names[V_COUNT] = {
		[V_SPIN] = "uring_nop_evpoll_spin",
		[V_EVENTFD] = "uring_nop_eventfd",
		[V_SAMBA] = "uring_nop_samba_fd",
	};
	uint64_t n = bench_count(20000, 1000000, 5000000);
	unsigned reps = bench_repeats(), rep, v;
	double vals[V_COUNT][16];

	for (rep = 0; rep < reps; rep++) {
		/* interleaved: every row sees the same machine noise */
		for (v = 0; v < V_COUNT; v++) {
			vals[v][rep] = nop_run((enum variant)v, n);
		}
	}
	for (v = 0; v < V_COUNT; v++) {
		struct bench_result r = {
			.name = names[v],
			.unit = "cqe/s",
			.value = bench_median(vals[v], reps),
			.baseline = v == V_SAMBA ? NULL : names[V_SAMBA],
		};

		bench_add(&r);
	}
}
