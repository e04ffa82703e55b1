/*
 * Tests of the io_uring completion adapter (evpoll_uring.h).
 *
 * Real io_uring work (NOPs, file reads, pipe reads, IORING_OP_MSG_RING
 * posts from another thread's ring) on a stock epoll loop and in every
 * evpoll mode, with plain rings and with IORING_SETUP_DEFER_TASKRUN rings.
 * Every CQE carries a kind and a sequence number in its user_data; a
 * bitmap proves that each expected CQE is delivered exactly once. No
 * assertion depends on timing: threads wait for each other through atomics
 * and evpoll_waker_may_sleep(), and timeouts only catch hangs.
 */
/* for tevent_loop_allow_nesting() in the nested loop test */
#define TEVENT_DEPRECATED 1

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "evpoll.h"
#include "evpoll_uring.h"
#include "testutil.h"

#define TIMEOUT_MS 60000

/* user_data: kind in the top byte, sequence number below */
#define KIND_SHIFT 56
#define SEQ_MASK ((1ULL << KIND_SHIFT) - 1)
enum kind { K_NOP = 1, K_READ, K_PIPE, K_MSG };

static uint64_t ud(enum kind k, uint64_t seq)
{
	return ((uint64_t)k << KIND_SHIFT) | seq;
}

/* ---- fixture ------------------------------------------------------------- */

struct variant {
	const char *spec;	/* tu_context() backend spec */
	unsigned ring_flags;
	const char *flags_name;
};

struct fx;
typedef void (*on_cqe_fn)(struct fx *f, struct io_uring_cqe *cqe);

struct fx {
	const struct variant *v;
	TALLOC_CTX *mem;
	struct tevent_context *ev;
	struct io_uring ring;
	bool ring_ok;
	struct evpoll_uring *u;
	pthread_t owner;
	on_cqe_fn on_cqe;
	void *arg;

	/* the exactly-once bitmap of one kind */
	enum kind kind;
	uint8_t *bits;
	uint64_t nbits;
	uint64_t seen;
	uint64_t dups;
	uint64_t bad;		/* wrong kind, out of range, bad result */
	uint64_t wrong_thread;
	uint64_t calls;
	/* read by other threads (flow control) */
	atomic_uint_fast64_t delivered;
};

static void tally_init(struct fx *f, enum kind k, uint64_t n)
{
	f->kind = k;
	f->nbits = n;
	f->bits = talloc_zero_array(f->mem, uint8_t, (size_t)(n + 7) / 8);
	assert_non_null(f->bits);
	f->seen = f->dups = f->bad = 0;
}

/* Mark a CQE's sequence number; false if it was bad or a duplicate. */
static bool tally_mark(struct fx *f, const struct io_uring_cqe *cqe)
{
	uint64_t seq = cqe->user_data & SEQ_MASK;

	if ((enum kind)(cqe->user_data >> KIND_SHIFT) != f->kind ||
	    seq >= f->nbits) {
		f->bad++;
		return false;
	}
	if (f->bits[seq / 8] & (1U << (seq % 8))) {
		f->dups++;
		return false;
	}
	f->bits[seq / 8] |= (uint8_t)(1U << (seq % 8));
	f->seen++;
	atomic_fetch_add_explicit(&f->delivered, 1, memory_order_release);
	return true;
}

static void tally_check(struct fx *f)
{
	uint64_t i;

	assert_int_equal(f->dups, 0);
	assert_int_equal(f->bad, 0);
	assert_int_equal(f->wrong_thread, 0);
	assert_int_equal(f->seen, f->nbits);
	for (i = 0; i < f->nbits; i++) {
		if ((f->bits[i / 8] & (1U << (i % 8))) == 0) {
			fail_msg("CQE %llu never delivered",
				 (unsigned long long)i);
		}
	}
}

static void fx_handler(struct tevent_context *ev, struct io_uring_cqe *cqe,
		       void *private_data)
{
	struct fx *f = private_data;

	f->calls++;
	if (!pthread_equal(pthread_self(), f->owner)) {
		f->wrong_thread++;
	}
	if (ev != f->ev) {
		f->bad++;
	}
	f->on_cqe(f, cqe);
}

static bool is_spec(const struct fx *f, const char *spec)
{
	return strcmp(f->v->spec, spec) == 0;
}

/* AUTO contexts spin only 1 ms, so tests see them fall asleep often. */
static void set_spin_ns(struct tevent_context *ev, uint64_t ns)
{
	struct evpoll_config cfg;

	if (!evpoll_is_evpoll(ev)) {
		return;
	}
	assert_int_equal(evpoll_get_config(ev, &cfg), 0);
	cfg.spin_ns = ns;
	assert_int_equal(evpoll_set_config(ev, &cfg), 0);
}

static int ring_init(struct io_uring *ring, unsigned entries, unsigned flags)
{
	struct io_uring_params p;

	memset(&p, 0, sizeof(p));
	p.flags = flags;
	return io_uring_queue_init_params(entries, ring, &p);
}

static struct evpoll_uring_stats stats_of(struct fx *f)
{
	struct evpoll_uring_stats st;

	assert_int_equal(evpoll_uring_get_stats(f->u, &st), 0);
	return st;
}

/*
 * Run the loop until the adapter's attach-time eventfd signal was handled.
 * From then on the eventfd is signalled only by the kernel, and not at all
 * while an evpoll loop spins (muted): an ALWAYS loop must deliver every
 * later CQE through its poll callback.
 */
static void fx_prime(struct fx *f)
{
	uint64_t t0 = tu_now_ns();

	while (stats_of(f).eventfd_wakeups == 0) {
		assert_int_equal(tevent_loop_once(f->ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
}

/* Context, ring and adapter; skips when the kernel lacks the ring flags. */
static void fx_start(struct fx *f, const struct variant *v, unsigned entries,
		     on_cqe_fn on_cqe, bool attach)
{
	int ret;

	memset(f, 0, sizeof(*f));
	atomic_init(&f->delivered, 0);
	f->v = v;
	f->owner = pthread_self();
	f->on_cqe = on_cqe;
	f->mem = talloc_new(NULL);
	assert_non_null(f->mem);
	f->ev = tu_context(f->mem, v->spec);
	set_spin_ns(f->ev, 1000000);
	ret = ring_init(&f->ring, entries, v->ring_flags);
	if (ret == -EINVAL && v->ring_flags != 0) {
		talloc_free(f->mem);
		skip();
	}
	assert_int_equal(ret, 0);
	f->ring_ok = true;
	if (attach) {
		f->u = evpoll_uring_attach(f->ev, f->mem, &f->ring, fx_handler,
					   f);
		assert_non_null(f->u);
		fx_prime(f);
	}
}

static void fx_stop(struct fx *f)
{
	TALLOC_FREE(f->u);
	if (f->ring_ok) {
		io_uring_queue_exit(&f->ring);
	}
	talloc_free(f->mem);
}

static struct io_uring_sqe *get_sqe(struct fx *f)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&f->ring);

	assert_non_null(sqe);
	return sqe;
}

/* What only one delivery path can have done, by backend. */
static void check_paths(struct fx *f)
{
	struct evpoll_uring_stats st = stats_of(f);

	assert_int_equal(st.cqes, st.cqes_polled + st.cqes_eventfd +
			 st.cqes_drained);
	if (is_spec(f, "epoll") || is_spec(f, "poll") ||
	    is_spec(f, "evpoll-never")) {
		/* no spinning: everything came through the eventfd */
		assert_int_equal(st.cqes_polled, 0);
		assert_int_equal(st.cqes_drained, 0);
		assert_int_equal(st.cqes_eventfd, st.cqes);
	}
	if (is_spec(f, "evpoll-always")) {
		/* primed, always spinning and muted: only the poll reaps */
		assert_int_equal(st.cqes_polled, st.cqes);
	}
	print_message("  %s/%s: %llu cqes: polled %llu, eventfd %llu, "
		      "drained %llu, eventfd wakeups %llu\n", f->v->spec,
		      f->v->flags_name, (unsigned long long)st.cqes,
		      (unsigned long long)st.cqes_polled,
		      (unsigned long long)st.cqes_eventfd,
		      (unsigned long long)st.cqes_drained,
		      (unsigned long long)st.eventfd_wakeups);
}

/* ---- NOPs: many, in batches, resubmitted from the handler ---------------- */

struct nops {
	uint64_t n;		/* total */
	uint64_t next;		/* next sequence number to submit */
	unsigned outstanding;
	unsigned depth;		/* keep up to this many in flight */
};

static void nops_refill(struct fx *f)
{
	struct nops *s = f->arg;
	unsigned added = 0;

	while (s->next < s->n && s->outstanding < s->depth) {
		struct io_uring_sqe *sqe = get_sqe(f);

		io_uring_prep_nop(sqe);
		if (s->next % 7 == 3) {
			/* completed by an io-wq worker: another CPU posts */
			sqe->flags |= IOSQE_ASYNC;
		}
		sqe->user_data = ud(K_NOP, s->next);
		s->next++;
		s->outstanding++;
		added++;
	}
	if (added > 0) {
		assert_int_equal(evpoll_uring_submit(f->u), (int)added);
	}
}

static void nops_on_cqe(struct fx *f, struct io_uring_cqe *cqe)
{
	struct nops *s = f->arg;

	if (cqe->res != 0) {
		f->bad++;
	}
	tally_mark(f, cqe);
	s->outstanding--;
	if (s->outstanding <= s->depth / 2) {
		nops_refill(f);
	}
}

static void test_nops(void **state)
{
	const struct variant *v = *state;
	struct nops s = { .n = tu_scale(10000), .depth = 64 };
	struct fx f;
	uint64_t t0 = tu_now_ns();

	fx_start(&f, v, 128, nops_on_cqe, true);
	f.arg = &s;
	tally_init(&f, K_NOP, s.n);
	nops_refill(&f);
	while (f.seen + f.dups + f.bad < s.n) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	tally_check(&f);
	assert_int_equal(stats_of(&f).inflight, 0);
	assert_int_equal(stats_of(&f).submitted, s.n);
	check_paths(&f);
	assert_int_equal(io_uring_cq_ready(&f.ring), 0);
	fx_stop(&f);
}

/* ---- file reads from a temporary file ------------------------------------ */

#define CHUNK 4096U

struct reads {
	int fd;
	uint8_t *buf;
	uint64_t nchunks;
	uint64_t next;
	unsigned outstanding;
};

static uint8_t pattern(uint64_t i)
{
	return (uint8_t)((i * 131U) ^ (i >> 12));
}

static int temp_file(uint64_t size)
{
	char path[] = "/tmp/evpoll-uring-XXXXXX";
	uint8_t block[CHUNK];
	uint64_t off;
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	unlink(path);
	for (off = 0; off < size; off += CHUNK) {
		uint64_t i;

		for (i = 0; i < CHUNK; i++) {
			block[i] = pattern(off + i);
		}
		assert_int_equal(pwrite(fd, block, CHUNK, (off_t)off), CHUNK);
	}
	return fd;
}

static void reads_refill(struct fx *f)
{
	struct reads *r = f->arg;
	unsigned added = 0;

	while (r->next < r->nchunks && r->outstanding < 16) {
		struct io_uring_sqe *sqe = get_sqe(f);

		io_uring_prep_read(sqe, r->fd, r->buf + r->next * CHUNK,
				   CHUNK, r->next * CHUNK);
		if (r->next % 2 == 1) {
			sqe->flags |= IOSQE_ASYNC;
		}
		sqe->user_data = ud(K_READ, r->next);
		r->next++;
		r->outstanding++;
		added++;
	}
	if (added > 0) {
		assert_int_equal(evpoll_uring_submit(f->u), (int)added);
	}
}

static void reads_on_cqe(struct fx *f, struct io_uring_cqe *cqe)
{
	struct reads *r = f->arg;

	if (cqe->res != (int)CHUNK) {
		f->bad++;
	}
	tally_mark(f, cqe);
	r->outstanding--;
	reads_refill(f);
}

static void test_file_read(void **state)
{
	const struct variant *v = *state;
	struct reads r = { .nchunks = tu_scale(256) < 16 ? 16 :
				      tu_scale(256) };
	struct fx f;
	uint64_t i, t0 = tu_now_ns();

	fx_start(&f, v, 64, reads_on_cqe, true);
	f.arg = &r;
	r.fd = temp_file(r.nchunks * CHUNK);
	r.buf = talloc_zero_array(f.mem, uint8_t, r.nchunks * CHUNK);
	assert_non_null(r.buf);
	tally_init(&f, K_READ, r.nchunks);
	reads_refill(&f);
	while (f.seen + f.dups + f.bad < r.nchunks) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	tally_check(&f);
	for (i = 0; i < r.nchunks * CHUNK; i++) {
		if (r.buf[i] != pattern(i)) {
			fail_msg("byte %llu differs", (unsigned long long)i);
		}
	}
	check_paths(&f);
	close(r.fd);
	fx_stop(&f);
}

/* ---- pipe reads, written later by another thread ------------------------- */

#define NPIPES 4

struct pipes {
	int fds[NPIPES][2];
	uint64_t buf[NPIPES];
	unsigned rounds;
	bool wait_sleep;	/* writer waits until the loop may sleep */
	struct evpoll_waker *waker;
	atomic_uint submitted_round;	/* rounds with reads in flight */
};

static void *pipe_writer(void *arg)
{
	struct fx *f = arg;
	struct pipes *p = f->arg;
	unsigned r, i;

	for (r = 0; r < p->rounds; r++) {
		struct timespec ts = { .tv_nsec = 500000 };

		while (atomic_load(&p->submitted_round) <= r) {
			nanosleep(&(struct timespec){ .tv_nsec = 50000 }, NULL);
		}
		/* let the loop fall asleep first */
		while (p->wait_sleep && !evpoll_waker_may_sleep(p->waker)) {
			nanosleep(&(struct timespec){ .tv_nsec = 50000 }, NULL);
		}
		nanosleep(&ts, NULL);
		for (i = 0; i < NPIPES; i++) {
			uint64_t tag = ud(K_PIPE, (uint64_t)r * NPIPES + i);

			if (write(p->fds[i][1], &tag, sizeof(tag)) !=
			    sizeof(tag)) {
				abort();
			}
		}
	}
	return NULL;
}

static void pipes_submit(struct fx *f, unsigned round)
{
	struct pipes *p = f->arg;
	unsigned i;

	for (i = 0; i < NPIPES; i++) {
		struct io_uring_sqe *sqe = get_sqe(f);

		io_uring_prep_read(sqe, p->fds[i][0], &p->buf[i],
				   sizeof(p->buf[i]), 0);
		sqe->user_data = ud(K_PIPE, (uint64_t)round * NPIPES + i);
	}
	assert_int_equal(evpoll_uring_submit(f->u), NPIPES);
	atomic_store(&p->submitted_round, round + 1);
}

static void pipes_on_cqe(struct fx *f, struct io_uring_cqe *cqe)
{
	struct pipes *p = f->arg;
	unsigned i = (unsigned)((cqe->user_data & SEQ_MASK) % NPIPES);

	if (cqe->res != (int)sizeof(uint64_t) ||
	    p->buf[i] != cqe->user_data) {
		f->bad++;
	}
	tally_mark(f, cqe);
}

static void test_pipe_read(void **state)
{
	const struct variant *v = *state;
	struct pipes p = { .rounds = (unsigned)tu_scale(40) };
	struct fx f;
	pthread_t t;
	unsigned r, i;
	uint64_t t0 = tu_now_ns();

	if (p.rounds < 4) {
		p.rounds = 4;
	}
	fx_start(&f, v, 64, pipes_on_cqe, true);
	f.arg = &p;
	for (i = 0; i < NPIPES; i++) {
		assert_int_equal(pipe(p.fds[i]), 0);
	}
	p.wait_sleep = is_spec(&f, "evpoll-auto");
	p.waker = evpoll_waker_get(f.ev);
	assert_non_null(p.waker);
	atomic_init(&p.submitted_round, 0);
	tally_init(&f, K_PIPE, (uint64_t)p.rounds * NPIPES);
	assert_int_equal(pthread_create(&t, NULL, pipe_writer, &f), 0);
	for (r = 0; r < p.rounds; r++) {
		pipes_submit(&f, r);
		while (f.seen + f.dups + f.bad < (uint64_t)(r + 1) * NPIPES) {
			assert_int_equal(tevent_loop_once(f.ev), 0);
			assert_true(tu_now_ns() - t0 <
				    TIMEOUT_MS * 1000000ULL);
		}
	}
	assert_int_equal(pthread_join(t, NULL), 0);
	tally_check(&f);
	assert_int_equal(stats_of(&f).inflight, 0);
	check_paths(&f);
	if (p.wait_sleep) {
		struct evpoll_stats es;

		/* the writer waited for the loop to stop spinning */
		assert_int_equal(evpoll_get_stats(f.ev, &es), 0);
		assert_true(es.spin_exits > 0);
	}
	evpoll_waker_unref(p.waker);
	for (i = 0; i < NPIPES; i++) {
		close(p.fds[i][0]);
		close(p.fds[i][1]);
	}
	fx_stop(&f);
}

/* ---- IORING_OP_MSG_RING from another thread's ring ----------------------- */

struct msgs {
	uint64_t n;
	int target_fd;
	unsigned window;	/* sent but not delivered, at most */
	bool wait_sleep;
	struct evpoll_waker *waker;
	atomic_uint_fast64_t sender_errors;
};

static void *msg_sender(void *arg)
{
	struct fx *f = arg;
	struct msgs *m = f->arg;
	struct io_uring ring;
	uint64_t sent = 0, burst_no = 0;
	unsigned seed = 12345;

	if (io_uring_queue_init(128, &ring, 0) != 0) {
		atomic_fetch_add(&m->sender_errors, 1);
		return NULL;
	}
	while (sent < m->n) {
		unsigned burst = 1 + rand_r(&seed) % 32, i;

		if (burst > m->n - sent) {
			burst = (unsigned)(m->n - sent);
		}
		/* flow control: the target's CQ never overflows */
		while (sent + burst - atomic_load_explicit(
				&f->delivered, memory_order_acquire) >
		       m->window) {
			nanosleep(&(struct timespec){ .tv_nsec = 20000 }, NULL);
		}
		if (burst_no % 4 == 3) {
			/* now and then, post to a sleeping loop */
			while (m->wait_sleep &&
			       !evpoll_waker_may_sleep(m->waker)) {
				nanosleep(&(struct timespec){
					.tv_nsec = 50000 }, NULL);
			}
			nanosleep(&(struct timespec){ .tv_nsec = 300000 },
				  NULL);
		}
		for (i = 0; i < burst; i++) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);

			/* the target's CQE: res = len, user_data = data */
			io_uring_prep_msg_ring(sqe, m->target_fd,
					       (unsigned)(sent + i),
					       ud(K_MSG, sent + i), 0);
			sqe->user_data = sent + i;
		}
		if (io_uring_submit(&ring) != (int)burst) {
			atomic_fetch_add(&m->sender_errors, 1);
			break;
		}
		for (i = 0; i < burst; i++) {
			struct io_uring_cqe *cqe;

			if (io_uring_wait_cqe(&ring, &cqe) != 0 ||
			    cqe->res != 0) {
				atomic_fetch_add(&m->sender_errors, 1);
			}
			io_uring_cqe_seen(&ring, cqe);
		}
		sent += burst;
		burst_no++;
	}
	io_uring_queue_exit(&ring);
	return NULL;
}

static void msgs_on_cqe(struct fx *f, struct io_uring_cqe *cqe)
{
	if ((uint64_t)(unsigned)cqe->res != (cqe->user_data & SEQ_MASK)) {
		f->bad++;
	}
	tally_mark(f, cqe);
}

static void test_msg_ring(void **state)
{
	const struct variant *v = *state;
	struct msgs m = { .n = tu_scale(5000), .window = 128 };
	struct fx f;
	pthread_t t;
	uint64_t t0 = tu_now_ns();

	fx_start(&f, v, 256, msgs_on_cqe, true);
	f.arg = &m;
	m.target_fd = f.ring.ring_fd;
	m.wait_sleep = is_spec(&f, "evpoll-auto");
	m.waker = evpoll_waker_get(f.ev);
	assert_non_null(m.waker);
	atomic_init(&m.sender_errors, 0);
	tally_init(&f, K_MSG, m.n);
	assert_int_equal(pthread_create(&t, NULL, msg_sender, &f), 0);
	while (f.seen + f.dups + f.bad < m.n &&
	       atomic_load(&m.sender_errors) == 0) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(atomic_load(&m.sender_errors), 0);
	tally_check(&f);
	check_paths(&f);
	evpoll_waker_unref(m.waker);
	fx_stop(&f);
}

/* ---- the switch: spinning to sleeping and back (AUTO, spin 1 ms) --------- */

/*
 * Many rounds of: a burst of MSG_RING posts while the loop spins (the
 * sender starts it as soon as the previous one was delivered), then, every
 * other round, a burst after the loop has stopped spinning. Completions so
 * arrive during spins, around the switch, and to a sleeping loop.
 */
static void test_switch(void **state)
{
	const struct variant *v = *state;
	struct msgs m = { .n = tu_scale(20000), .window = 32 };
	struct fx f;
	struct evpoll_stats es;
	pthread_t t;
	uint64_t t0 = tu_now_ns();

	fx_start(&f, v, 256, msgs_on_cqe, true);
	f.arg = &m;
	m.target_fd = f.ring.ring_fd;
	m.wait_sleep = true;
	m.waker = evpoll_waker_get(f.ev);
	atomic_init(&m.sender_errors, 0);
	tally_init(&f, K_MSG, m.n);
	assert_int_equal(pthread_create(&t, NULL, msg_sender, &f), 0);
	while (f.seen + f.dups + f.bad < m.n &&
	       atomic_load(&m.sender_errors) == 0) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	assert_int_equal(pthread_join(t, NULL), 0);
	assert_int_equal(atomic_load(&m.sender_errors), 0);
	tally_check(&f);
	check_paths(&f);
	assert_int_equal(evpoll_get_stats(f.ev, &es), 0);
	print_message("  spin entries %llu, exits %llu\n",
		      (unsigned long long)es.spin_entries,
		      (unsigned long long)es.spin_exits);
	/*
	 * The sender waited for "may sleep" before every fourth burst, and
	 * that burst woke the loop, which spun again.
	 */
	assert_true(es.spin_exits > 0);
	assert_true(es.spin_entries >= 2);
	evpoll_waker_unref(m.waker);
	fx_stop(&f);
}

/*
 * The drain at the switch, made deterministic: CQEs posted while the loop
 * spins with the eventfd muted, then the spin times out before any poll
 * pass runs (a spin_once checks the spin timeout before it polls). Without
 * the drain in the exit callback these CQEs would never be delivered: the
 * kernel did not signal the eventfd for them.
 */
static void count_on_cqe(struct fx *f, struct io_uring_cqe *cqe)
{
	tally_mark(f, cqe);
}

static void test_exit_drain(void **state)
{
	const struct variant *v = *state;
	struct fx f;
	struct evpoll_uring_stats st;
	uint64_t i, n = 50, t0 = tu_now_ns();

	fx_start(&f, v, 64, count_on_cqe, true);
	tally_init(&f, K_NOP, n);
	set_spin_ns(f.ev, 10ULL * 1000000000ULL);
	/* deliver the attach-time signal, then spin (muted) */
	while (stats_of(&f).eventfd_wakeups == 0 ||
	       !evpoll_is_spinning(f.ev)) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	for (i = 0; i < n; i++) {
		struct io_uring_sqe *sqe = get_sqe(&f);

		io_uring_prep_nop(sqe);
		sqe->user_data = ud(K_NOP, i);
	}
	assert_int_equal(evpoll_uring_submit(f.u), (int)n);
	set_spin_ns(f.ev, 1000);
	nanosleep(&(struct timespec){ .tv_nsec = 2000000 }, NULL);
	while (f.seen + f.dups + f.bad < n) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	tally_check(&f);
	st = stats_of(&f);
	assert_int_equal(st.cqes_drained, n);
	assert_int_equal(st.cqes_polled, 0);
	fx_stop(&f);
}

/* ---- pin while in flight ------------------------------------------------- */

static void test_pin_inflight(void **state)
{
	const struct variant *v = *state;
	struct pipes p;
	struct fx f;
	struct tu_debug_log log;
	unsigned i, k;
	uint64_t t0 = tu_now_ns();

	memset(&p, 0, sizeof(p));
	fx_start(&f, v, 64, pipes_on_cqe, true);
	f.arg = &p;
	tu_capture_debug(f.ev, &log);
	set_spin_ns(f.ev, 1000);	/* 1 us: without a pin it sleeps */
	for (i = 0; i < NPIPES; i++) {
		assert_int_equal(pipe(p.fds[i]), 0);
	}
	tally_init(&f, K_PIPE, 2 * NPIPES);
	assert_int_equal(evpoll_uring_set_pin_inflight(f.u, true), 0);

	/* round 0: in flight -> spinning; completed -> not spinning */
	pipes_submit(&f, 0);
	assert_int_equal(stats_of(&f).inflight, NPIPES);
	for (k = 0; k < 200; k++) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(evpoll_is_spinning(f.ev));
	}
	for (i = 0; i < NPIPES; i++) {
		uint64_t tag = ud(K_PIPE, i);

		assert_int_equal(write(p.fds[i][1], &tag, sizeof(tag)),
				 sizeof(tag));
	}
	while (f.seen + f.dups + f.bad < NPIPES) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	assert_int_equal(stats_of(&f).inflight, 0);
	while (evpoll_is_spinning(f.ev)) {
		/* the last spin ends after 1 us idle, without sleeping */
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}

	/* round 1: pinned, then the option goes off: the spin ends */
	pipes_submit(&f, 1);
	assert_int_equal(tevent_loop_once(f.ev), 0);
	assert_true(evpoll_is_spinning(f.ev));
	assert_int_equal(evpoll_uring_set_pin_inflight(f.u, false), 0);
	while (evpoll_is_spinning(f.ev)) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	/* on again while in flight: spinning again */
	assert_int_equal(evpoll_uring_set_pin_inflight(f.u, true), 0);
	assert_int_equal(tevent_loop_once(f.ev), 0);
	assert_true(evpoll_is_spinning(f.ev));

	/* detach while pinned and in flight: the pin goes with it */
	TALLOC_FREE(f.u);
	while (evpoll_is_spinning(f.ev)) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	/* the reads complete into the ring, for the caller */
	for (i = 0; i < NPIPES; i++) {
		uint64_t tag = ud(K_PIPE, NPIPES + i);

		assert_int_equal(write(p.fds[i][1], &tag, sizeof(tag)),
				 sizeof(tag));
	}
	for (i = 0; i < NPIPES; i++) {
		struct io_uring_cqe *cqe;

		assert_int_equal(io_uring_wait_cqe(&f.ring, &cqe), 0);
		assert_int_equal(cqe->res, sizeof(uint64_t));
		io_uring_cqe_seen(&f.ring, cqe);
	}
	assert_int_equal(f.seen, NPIPES);
	/* no "evpoll_unpin() without evpoll_pin()" */
	assert_int_equal(log.count, 0);
	for (i = 0; i < NPIPES; i++) {
		close(p.fds[i][0]);
		close(p.fds[i][1]);
	}
	fx_stop(&f);
}

/* ---- detach -------------------------------------------------------------- */

struct detach {
	uint64_t free_at;	/* free the adapter in the handler of this */
	bool freed;
};

static void detach_on_cqe(struct fx *f, struct io_uring_cqe *cqe)
{
	struct detach *d = f->arg;

	if (d->freed) {
		f->bad++;	/* delivered after the adapter was freed */
		return;
	}
	tally_mark(f, cqe);
	if ((cqe->user_data & SEQ_MASK) == d->free_at) {
		TALLOC_FREE(f->u);
		d->freed = true;
	}
}

static void timer_done(struct tevent_context *ev, struct tevent_timer *te,
		       struct timeval now, void *private_data)
{
	*(bool *)private_data = true;
}

/* The eventfd is gone from the ring and notification is back on. */
static void check_detached_ring(struct io_uring *ring)
{
	int efd = eventfd(0, EFD_CLOEXEC);

	assert_true(efd >= 0);
	assert_int_equal(io_uring_register_eventfd(ring, efd), 0);
	assert_int_equal(io_uring_unregister_eventfd(ring), 0);
	close(efd);
	assert_true(io_uring_cq_eventfd_enabled(ring));
}

static void test_detach_in_handler(void **state)
{
	const struct variant *v = *state;
	struct detach d = { .free_at = 9 };
	struct fx f;
	uint64_t i, n = 100;
	bool later = false;

	fx_start(&f, v, 128, detach_on_cqe, true);
	f.arg = &d;
	tally_init(&f, K_NOP, n);
	for (i = 0; i < n; i++) {
		struct io_uring_sqe *sqe = get_sqe(&f);

		io_uring_prep_nop(sqe);
		sqe->user_data = ud(K_NOP, i);
	}
	assert_int_equal(evpoll_uring_submit(f.u), (int)n);
	tu_loop_until(f.ev, &d.freed, TIMEOUT_MS);
	/* a few more iterations: nothing more is delivered */
	tevent_add_timer(f.ev, f.mem, tevent_timeval_current_ofs(0, 2000),
			 timer_done, &later);
	tu_loop_until(f.ev, &later, TIMEOUT_MS);
	assert_int_equal(f.calls, d.free_at + 1);
	assert_int_equal(f.seen, d.free_at + 1);
	assert_int_equal(f.bad + f.dups, 0);
	/* CQEs 0..9 were seen exactly once; 10..99 wait for the caller */
	assert_int_equal(io_uring_cq_ready(&f.ring), n - d.free_at - 1);
	for (i = d.free_at + 1; i < n; i++) {
		struct io_uring_cqe *cqe;

		assert_int_equal(io_uring_peek_cqe(&f.ring, &cqe), 0);
		assert_int_equal(cqe->user_data, ud(K_NOP, i));
		io_uring_cqe_seen(&f.ring, cqe);
	}
	check_detached_ring(&f.ring);
	fx_stop(&f);
}

/* Detach from outside, while the loop spins with the eventfd muted. */
static void test_detach_while_spinning(void **state)
{
	const struct variant *v = *state;
	struct fx f;
	struct tu_debug_log log;
	uint64_t t0 = tu_now_ns(), i;

	fx_start(&f, v, 64, count_on_cqe, true);
	tu_capture_debug(f.ev, &log);
	tally_init(&f, K_NOP, 8);
	set_spin_ns(f.ev, 10ULL * 1000000000ULL);
	assert_int_equal(evpoll_uring_set_pin_inflight(f.u, true), 0);
	assert_int_equal(evpoll_uring_add_inflight(f.u, 3), 0);
	while (stats_of(&f).eventfd_wakeups == 0 ||
	       !evpoll_is_spinning(f.ev)) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	/* CQEs the spinning loop has not reaped yet */
	for (i = 0; i < 8; i++) {
		struct io_uring_sqe *sqe = get_sqe(&f);

		io_uring_prep_nop(sqe);
		sqe->user_data = ud(K_NOP, i);
	}
	assert_int_equal(io_uring_submit(&f.ring), 8);
	TALLOC_FREE(f.u);
	assert_int_equal(f.calls, 0);
	assert_int_equal(io_uring_cq_ready(&f.ring), 8);
	check_detached_ring(&f.ring);
	/* the pin went with the adapter (ALWAYS keeps spinning anyway) */
	set_spin_ns(f.ev, 1000);
	if (!is_spec(&f, "evpoll-always")) {
		while (evpoll_is_spinning(f.ev)) {
			assert_int_equal(tevent_loop_once(f.ev), 0);
			assert_true(tu_now_ns() - t0 <
				    TIMEOUT_MS * 1000000ULL);
		}
	}
	assert_int_equal(f.calls, 0);
	assert_int_equal(log.count, 0);
	fx_stop(&f);
}

/* ---- nested loops inside the handler ------------------------------------- */

/*
 * A handler that runs a nested loop and waits there for other CQEs of the
 * same ring: (A) CQEs already in the queue (the eventfd was drained, or is
 * muted while spinning, and evpoll does not re-enter a running poll), (B) a
 * CQE posted by a request the handler submits, (D) a timer in the nested
 * loop, which must not starve, that submits the request whose CQE the
 * handler waits for, (C) the adapter freed by a nested handler while the
 * outer handler still runs.
 */
#define NEST_A 40	/* 0..39: the handler of 0 waits for 39 */
#define NEST_B 40	/* the handler of 40 submits 41 and waits for it */
#define NEST_D 42	/* the handler of 42 waits for a timer that submits
			 * 43, then for 43 */
#define NEST_C 44	/* 44..51: the handler of 44 waits for 47, whose
			 * nested handler frees the adapter */
#define NEST_N 52

struct nested {
	unsigned depth;
	uint64_t t0;
	bool timer_fired;
	bool freed;
	uint64_t after_free;
};

static bool seen_seq(struct fx *f, uint64_t seq)
{
	return (f->bits[seq / 8] & (1U << (seq % 8))) != 0;
}

static void nested_wait(struct fx *f, uint64_t seq)
{
	struct nested *s = f->arg;

	s->depth++;
	while (!seen_seq(f, seq)) {
		assert_int_equal(tevent_loop_once(f->ev), 0);
		assert_true(tu_now_ns() - s->t0 < TIMEOUT_MS * 1000000ULL);
	}
	s->depth--;
}

static void submit_nops(struct fx *f, uint64_t from, uint64_t to)
{
	uint64_t i;

	for (i = from; i < to; i++) {
		struct io_uring_sqe *sqe = get_sqe(f);

		io_uring_prep_nop(sqe);
		sqe->user_data = ud(K_NOP, i);
	}
	assert_int_equal(evpoll_uring_submit(f->u), (int)(to - from));
}

static void nested_timer(struct tevent_context *ev, struct tevent_timer *te,
			 struct timeval now, void *private_data)
{
	struct fx *f = private_data;
	struct nested *s = f->arg;

	s->timer_fired = true;
	submit_nops(f, NEST_D + 1, NEST_D + 2);
}

static void nested_on_cqe(struct fx *f, struct io_uring_cqe *cqe)
{
	struct nested *s = f->arg;
	uint64_t seq = cqe->user_data & SEQ_MASK;

	if (s->freed) {
		s->after_free++;
		return;
	}
	tally_mark(f, cqe);
	switch (seq) {
	case 0:
		nested_wait(f, NEST_A - 1);
		break;
	case NEST_B:
		submit_nops(f, NEST_B + 1, NEST_B + 2);
		nested_wait(f, NEST_B + 1);
		break;
	case NEST_D:
		assert_non_null(tevent_add_timer(
			f->ev, f->mem, tevent_timeval_current_ofs(0, 1000),
			nested_timer, f));
		nested_wait(f, NEST_D + 1);
		assert_true(s->timer_fired);
		break;
	case NEST_C:
		nested_wait(f, NEST_C + 3);
		break;
	case NEST_C + 3:
		assert_true(s->depth > 0);
		TALLOC_FREE(f->u);
		s->freed = true;
		break;
	}
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
static void allow_nesting(struct tevent_context *ev)
{
	tevent_loop_allow_nesting(ev);
}
#pragma GCC diagnostic pop

static void test_nested_loop(void **state)
{
	const struct variant *v = *state;
	struct nested s = { .t0 = tu_now_ns() };
	struct fx f;
	uint64_t i;
	bool later = false;

	fx_start(&f, v, 128, nested_on_cqe, true);
	f.arg = &s;
	allow_nesting(f.ev);
	tally_init(&f, K_NOP, NEST_N);

	submit_nops(&f, 0, NEST_A);
	while (!seen_seq(&f, NEST_A - 1)) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - s.t0 < TIMEOUT_MS * 1000000ULL);
	}
	submit_nops(&f, NEST_B, NEST_B + 1);
	while (!seen_seq(&f, NEST_B + 1)) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - s.t0 < TIMEOUT_MS * 1000000ULL);
	}
	submit_nops(&f, NEST_D, NEST_D + 1);
	while (!seen_seq(&f, NEST_D + 1)) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - s.t0 < TIMEOUT_MS * 1000000ULL);
	}
	assert_int_equal(f.seen, NEST_C);
	assert_int_equal(f.dups + f.bad, 0);

	submit_nops(&f, NEST_C, NEST_N);
	tu_loop_until(f.ev, &s.freed, TIMEOUT_MS);
	tevent_add_timer(f.ev, f.mem, tevent_timeval_current_ofs(0, 2000),
			 timer_done, &later);
	tu_loop_until(f.ev, &later, TIMEOUT_MS);
	assert_int_equal(s.after_free, 0);
	assert_int_equal(f.dups + f.bad + f.wrong_thread, 0);
	/* 44..47 delivered; 48..51 stay in the ring for the caller */
	assert_int_equal(f.seen, NEST_C + 4);
	assert_int_equal(io_uring_cq_ready(&f.ring), NEST_N - NEST_C - 4);
	for (i = NEST_C + 4; i < NEST_N; i++) {
		struct io_uring_cqe *cqe;

		assert_int_equal(io_uring_peek_cqe(&f.ring, &cqe), 0);
		assert_int_equal(cqe->user_data, ud(K_NOP, i));
		io_uring_cqe_seen(&f.ring, cqe);
	}
	check_detached_ring(&f.ring);
	fx_stop(&f);
}

/* ---- a burst of completions that arrive as task work --------------------- */

/*
 * Many requests completed by io-wq workers at once: on a DEFER_TASKRUN ring
 * each completion becomes task work, the eventfd is signalled only when
 * the work list goes from empty to non-empty, and the kernel runs a bounded
 * amount of it per io_uring_get_events(): the adapter must keep running it
 * until it yields nothing, or completions are stranded.
 */
static void test_async_burst(void **state)
{
	const struct variant *v = *state;
	struct fx f;
	uint64_t i, round, n = 256, rounds = tu_scale(10) < 2 ? 2 :
						     tu_scale(10);
	uint64_t t0 = tu_now_ns();

	fx_start(&f, v, 256, count_on_cqe, true);
	tally_init(&f, K_NOP, n * rounds);
	for (round = 0; round < rounds; round++) {
		for (i = 0; i < n; i++) {
			struct io_uring_sqe *sqe = get_sqe(&f);

			io_uring_prep_nop(sqe);
			sqe->flags |= IOSQE_ASYNC;
			sqe->user_data = ud(K_NOP, round * n + i);
		}
		assert_int_equal(evpoll_uring_submit(f.u), (int)n);
		if (round % 2 == 0) {
			/* let the workers finish: all of it queues up */
			nanosleep(&(struct timespec){ .tv_nsec = 20000000 },
				  NULL);
		}
		while (f.seen + f.dups + f.bad < (round + 1) * n) {
			assert_int_equal(tevent_loop_once(f.ev), 0);
			assert_true(tu_now_ns() - t0 <
				    TIMEOUT_MS * 1000000ULL);
		}
	}
	tally_check(&f);
	check_paths(&f);
	fx_stop(&f);
}

/* ---- CQEs already in the ring at attach time ----------------------------- */

static void test_preexisting(void **state)
{
	const struct variant *v = *state;
	struct fx f;
	uint64_t i, n = 20, t0 = tu_now_ns();

	fx_start(&f, v, 64, count_on_cqe, false);
	tally_init(&f, K_NOP, n);
	for (i = 0; i < n; i++) {
		struct io_uring_sqe *sqe = get_sqe(&f);

		io_uring_prep_nop(sqe);
		sqe->user_data = ud(K_NOP, i);
	}
	assert_int_equal(io_uring_submit(&f.ring), (int)n);
	/* a stale mute must not leave the new adapter deaf */
	io_uring_cq_eventfd_toggle(&f.ring, false);
	f.u = evpoll_uring_attach(f.ev, f.mem, &f.ring, fx_handler, &f);
	assert_non_null(f.u);
	while (f.seen + f.dups + f.bad < n) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	tally_check(&f);
	fx_stop(&f);
}

/* ---- the tevent context freed before the adapter ------------------------- */

static void test_context_freed_first(void **state)
{
	const struct variant *v = *state;
	struct fx f;
	struct evpoll_uring_stats st;
	struct io_uring_sqe *sqe;
	TALLOC_CTX *keep;
	uint64_t t0 = tu_now_ns();

	fx_start(&f, v, 64, count_on_cqe, false);
	tally_init(&f, K_NOP, 2);
	keep = talloc_new(NULL);
	f.u = evpoll_uring_attach(f.ev, keep, &f.ring, fx_handler, &f);
	assert_non_null(f.u);
	assert_int_equal(evpoll_uring_set_pin_inflight(f.u, true), 0);
	sqe = get_sqe(&f);
	io_uring_prep_nop(sqe);
	sqe->user_data = ud(K_NOP, 0);
	assert_int_equal(evpoll_uring_submit(f.u), 1);
	while (f.seen < 1) {
		assert_int_equal(tevent_loop_once(f.ev), 0);
		assert_true(tu_now_ns() - t0 < TIMEOUT_MS * 1000000ULL);
	}
	/* in flight and pinned when the context goes */
	assert_int_equal(evpoll_uring_add_inflight(f.u, 1), 0);
	TALLOC_FREE(f.ev);
	sqe = get_sqe(&f);
	io_uring_prep_nop(sqe);
	sqe->user_data = ud(K_NOP, 1);
	assert_int_equal(evpoll_uring_submit(f.u), 1);
	assert_int_equal(evpoll_uring_get_stats(f.u, &st), 0);
	assert_int_equal(st.inflight, 2);
	assert_int_equal(evpoll_uring_set_pin_inflight(f.u, false), 0);
	talloc_free(keep);
	f.u = NULL;
	assert_int_equal(f.calls, 1);
	check_detached_ring(&f.ring);
	fx_stop(&f);
}

/* ---- argument checks ----------------------------------------------------- */

static void nop_handler(struct tevent_context *ev, struct io_uring_cqe *cqe,
			void *private_data)
{
}

static void test_null_args(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "evpoll-auto");
	struct io_uring ring, zero, iopoll;
	struct evpoll_uring *u, *u2;
	struct evpoll_uring_stats st;

	assert_int_equal(io_uring_queue_init(8, &ring, 0), 0);

	errno = 0;
	assert_null(evpoll_uring_attach(NULL, mem, &ring, nop_handler, NULL));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_uring_attach(ev, mem, NULL, nop_handler, NULL));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_uring_attach(ev, mem, &ring, NULL, NULL));
	assert_int_equal(errno, EINVAL);
	memset(&zero, 0, sizeof(zero));
	errno = 0;
	assert_null(evpoll_uring_attach(ev, mem, &zero, nop_handler, NULL));
	assert_int_equal(errno, EINVAL);
	if (io_uring_queue_init(8, &iopoll, IORING_SETUP_IOPOLL) == 0) {
		errno = 0;
		assert_null(evpoll_uring_attach(ev, mem, &iopoll,
						nop_handler, NULL));
		assert_int_equal(errno, EINVAL);
		io_uring_queue_exit(&iopoll);
	}

	assert_int_equal(evpoll_uring_submit(NULL), -EINVAL);
	assert_int_equal(evpoll_uring_add_inflight(NULL, 1), EINVAL);
	assert_int_equal(evpoll_uring_set_pin_inflight(NULL, true), EINVAL);
	assert_int_equal(evpoll_uring_get_stats(NULL, &st), EINVAL);

	u = evpoll_uring_attach(ev, mem, &ring, nop_handler, NULL);
	assert_non_null(u);
	assert_int_equal(evpoll_uring_get_stats(u, NULL), EINVAL);
	/* one eventfd per ring: a second adapter is refused */
	io_uring_cq_eventfd_toggle(&ring, false);
	errno = 0;
	u2 = evpoll_uring_attach(ev, mem, &ring, nop_handler, NULL);
	assert_null(u2);
	assert_int_equal(errno, EBUSY);
	/* ... without touching the ring's eventfd flag */
	assert_false(io_uring_cq_eventfd_enabled(&ring));
	io_uring_cq_eventfd_toggle(&ring, true);
	/* nothing to submit */
	assert_int_equal(evpoll_uring_submit(u), 0);
	assert_int_equal(evpoll_uring_add_inflight(u, -5), 0);
	assert_int_equal(evpoll_uring_get_stats(u, &st), 0);
	assert_int_equal(st.inflight, 0);
	assert_int_equal(evpoll_uring_add_inflight(u, 3), 0);
	assert_int_equal(evpoll_uring_add_inflight(u, -2), 0);
	assert_int_equal(evpoll_uring_get_stats(u, &st), 0);
	assert_int_equal(st.inflight, 1);
	talloc_free(u);
	check_detached_ring(&ring);
	io_uring_queue_exit(&ring);
	talloc_free(mem);
}

/* ---- the test matrix ----------------------------------------------------- */

static const char *const specs[] = {
	"epoll", "evpoll-never", "evpoll-auto", "evpoll-always", NULL,
};

static const struct {
	unsigned flags;
	const char *name;
} ring_kinds[] = {
	{ 0, "plain" },
	{ IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, "defer" },
	{ IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
	  IORING_SETUP_TASKRUN_FLAG, "defer+flag" },
	{ IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG, "coop" },
};

#define NRING_KINDS (sizeof(ring_kinds) / sizeof(ring_kinds[0]))

enum scope { ALL_SPECS, AUTO_ONLY, EVPOLL_SPINNERS };

static const struct {
	const char *name;
	CMUnitTestFunction fn;
	enum scope scope;
	bool ring_kinds;
} tests[] = {
	{ "nops", test_nops, ALL_SPECS, true },
	{ "file_read", test_file_read, ALL_SPECS, true },
	{ "pipe_read", test_pipe_read, ALL_SPECS, true },
	{ "msg_ring", test_msg_ring, ALL_SPECS, true },
	{ "switch", test_switch, AUTO_ONLY, true },
	{ "exit_drain", test_exit_drain, AUTO_ONLY, true },
	{ "pin_inflight", test_pin_inflight, AUTO_ONLY, false },
	{ "detach_in_handler", test_detach_in_handler, ALL_SPECS, false },
	{ "detach_while_spinning", test_detach_while_spinning,
	  EVPOLL_SPINNERS, false },
	{ "nested_loop", test_nested_loop, ALL_SPECS, true },
	{ "async_burst", test_async_burst, ALL_SPECS, true },
	{ "preexisting", test_preexisting, ALL_SPECS, true },
	{ "context_freed_first", test_context_freed_first, ALL_SPECS, false },
};

static bool in_scope(enum scope s, const char *spec)
{
	switch (s) {
	case ALL_SPECS:
		return true;
	case AUTO_ONLY:
		return strcmp(spec, "evpoll-auto") == 0;
	case EVPOLL_SPINNERS:
		return strcmp(spec, "evpoll-auto") == 0 ||
		       strcmp(spec, "evpoll-always") == 0;
	}
	return false;
}

int main(void)
{
	size_t ntests = sizeof(tests) / sizeof(tests[0]);
	size_t max = ntests * 4 * NRING_KINDS + 1, n = 0, t, s, k;
	struct CMUnitTest *group = calloc(max, sizeof(*group));
	struct variant *vars = calloc(max, sizeof(*vars));
	int ret;

	if (group == NULL || vars == NULL || !evpoll_init()) {
		return 1;
	}
	for (t = 0; t < ntests; t++) {
		for (s = 0; specs[s] != NULL; s++) {
			if (!in_scope(tests[t].scope, specs[s])) {
				continue;
			}
			for (k = 0; k < NRING_KINDS; k++) {
				char *name;

				if (k > 0 && !tests[t].ring_kinds) {
					break;
				}
				vars[n].spec = specs[s];
				vars[n].ring_flags = ring_kinds[k].flags;
				vars[n].flags_name = ring_kinds[k].name;
				name = talloc_asprintf(NULL, "%s/%s/%s",
						       tests[t].name, specs[s],
						       ring_kinds[k].name);
				if (name == NULL) {
					return 1;
				}
				group[n].name = name;
				group[n].test_func = tests[t].fn;
				group[n].initial_state = &vars[n];
				n++;
			}
		}
	}
	group[n].name = "null_args";
	group[n].test_func = test_null_args;
	n++;
	ret = _cmocka_run_group_tests("uring", group, n, NULL, NULL);
	for (t = 0; t + 1 < n; t++) {
		talloc_free((char *)(uintptr_t)group[t].name);
	}
	free(group);
	free(vars);
	return ret;
}
