/*
 * Tests of the RDMA completion-queue adapter (evpoll_rdma.h).
 *
 * This machine has no RDMA device, so the tests build a fake provider: a
 * struct verbs_context whose ibv_context ops implement poll_cq and
 * req_notify_cq (what the static inline ibv_poll_cq() and
 * ibv_req_notify_cq() of <infiniband/verbs.h> call), a struct ibv_cq on it,
 * and a completion channel whose fd is a pipe the fake writes events to.
 * The adapter then runs the REAL ibv_get_cq_event() and ibv_ack_cq_events()
 * of libibverbs against it:
 * - ibv_get_cq_event() reads one struct ib_uverbs_comp_event_desc (8
 *   bytes) from channel->fd, takes its cq_handle as the struct ibv_cq
 *   pointer, and calls the provider's cq_event op through the
 *   verbs_context's private ops table (verbs_context.priv, libibverbs'
 *   struct verbs_ex_private, not installed; in rdma-core 44 its ops.cq_event
 *   sits 0x78 bytes in). The fake points priv at a table whose every slot
 *   is its cq_event, so the call lands there whatever the private layout;
 *   it counts the events read;
 * - ibv_ack_cq_events() adds to cq->comp_events_completed under cq->mutex
 *   and signals cq->cond, all in the fake's struct ibv_cq.
 *
 * The fake CQ behaves like hardware: a FIFO of completions; arming
 * (req_notify_cq) makes the next completion write one event to the
 * channel and disarms; completions already queued raise none. Knobs inject
 * completions inside req_notify_cq to play the re-arm race, and make
 * operations fail.
 */
/* for tevent_loop_allow_nesting(), in the nested-loop test */
#define TEVENT_DEPRECATED 1

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include <infiniband/verbs.h>
#include <rdma/ib_user_verbs.h>

#include "evpoll.h"
#include "evpoll_rdma.h"
#include "testutil.h"

#define WATCHDOG_SECONDS 30

/* ---------------------------------------------------------------------
 * The fake provider
 */

typedef void (*cq_event_op)(struct ibv_cq *cq);

struct fake {
	struct verbs_context vctx;	/* vctx.context is the ibv_context */
	/* stands in for libibverbs' struct verbs_ex_private, see the top */
	cq_event_op priv_ops[64];
	struct ibv_comp_channel channel;
	struct ibv_cq cq;
	/* a second CQ on the same channel, for the foreign-event test */
	struct ibv_cq other_cq;
	int wfd;	/* write end of the channel's pipe */

	/* everything below under lock (a producer thread may push) */
	pthread_mutex_t lock;
	uint64_t *queue;
	size_t qcap, qhead, qtail;
	uint64_t next_wr_id;
	bool armed;
	unsigned arms;			/* successful arms */
	unsigned arms_while_armed;	/* wasted ones */
	unsigned events_written;
	unsigned events_read;		/* cq_event op calls for cq */
	unsigned other_events_read;	/* ... for other_cq */
	unsigned poll_calls;
	/* knobs */
	unsigned race_before_arm;	/* add in req_notify, no event */
	unsigned race_after_arm;	/* add in req_notify, event */
	int notify_error;		/* req_notify_cq returns this */
	unsigned poll_errors;		/* poll_cq fails this many times */
};

static struct fake *fake_of_cq(struct ibv_cq *cq)
{
	return cq->cq_context;
}

static void fake_write_event_locked(struct fake *f, struct ibv_cq *cq)
{
	struct ib_uverbs_comp_event_desc desc = {
		.cq_handle = (uintptr_t)cq,
	};

	assert_int_equal(write(f->wfd, &desc, sizeof(desc)), sizeof(desc));
	if (cq == &f->cq) {
		f->events_written++;
	}
}

/* A completion is added to the CQ, as the hardware does. */
static void fake_complete_locked(struct fake *f)
{
	assert_true(f->qtail - f->qhead < f->qcap);
	f->queue[f->qtail % f->qcap] = f->next_wr_id++;
	f->qtail++;
	if (f->armed) {
		f->armed = false;
		fake_write_event_locked(f, &f->cq);
	}
}

static void fake_complete(struct fake *f, unsigned n)
{
	unsigned i;

	pthread_mutex_lock(&f->lock);
	for (i = 0; i < n; i++) {
		fake_complete_locked(f);
	}
	pthread_mutex_unlock(&f->lock);
}

static int fake_poll_cq(struct ibv_cq *cq, int num_entries,
			struct ibv_wc *wc)
{
	struct fake *f = fake_of_cq(cq);
	int n = 0;

	pthread_mutex_lock(&f->lock);
	f->poll_calls++;
	if (f->poll_errors > 0) {
		f->poll_errors--;
		pthread_mutex_unlock(&f->lock);
		return -1;
	}
	while (n < num_entries && f->qhead != f->qtail) {
		memset(&wc[n], 0, sizeof(wc[n]));
		wc[n].wr_id = f->queue[f->qhead % f->qcap];
		wc[n].status = IBV_WC_SUCCESS;
		wc[n].opcode = IBV_WC_RECV;
		wc[n].byte_len = 64;
		wc[n].qp_num = 7;
		f->qhead++;
		n++;
	}
	pthread_mutex_unlock(&f->lock);
	return n;
}

static int fake_req_notify_cq(struct ibv_cq *cq, int solicited_only)
{
	struct fake *f = fake_of_cq(cq);

	pthread_mutex_lock(&f->lock);
	if (f->notify_error != 0) {
		int ret = f->notify_error;

		pthread_mutex_unlock(&f->lock);
		return ret;
	}
	if (f->race_before_arm > 0) {
		/* landed after the consumer saw the CQ empty, before the arm */
		f->race_before_arm--;
		fake_complete_locked(f);
	}
	f->arms++;
	if (f->armed) {
		f->arms_while_armed++;
	}
	f->armed = true;
	if (f->race_after_arm > 0) {
		/* landed right after the arm: raises the event */
		f->race_after_arm--;
		fake_complete_locked(f);
	}
	pthread_mutex_unlock(&f->lock);
	return 0;
}

/* The provider's cq_event op, called by the real ibv_get_cq_event(). */
static void fake_cq_event(struct ibv_cq *cq)
{
	struct fake *f = fake_of_cq(cq);

	pthread_mutex_lock(&f->lock);
	if (cq == &f->cq) {
		f->events_read++;
	} else {
		f->other_events_read++;
	}
	pthread_mutex_unlock(&f->lock);
}

static void fake_init_cq(struct fake *f, struct ibv_cq *cq)
{
	cq->context = &f->vctx.context;
	cq->channel = &f->channel;
	cq->cq_context = f;
	cq->cqe = (int)f->qcap;
	cq->comp_events_completed = 0;
	cq->async_events_completed = 0;
	assert_int_equal(pthread_mutex_init(&cq->mutex, NULL), 0);
	assert_int_equal(pthread_cond_init(&cq->cond, NULL), 0);
}

static int fake_destructor(struct fake *f)
{
	close(f->channel.fd);
	if (f->wfd != -1) {
		close(f->wfd);
	}
	pthread_mutex_destroy(&f->cq.mutex);
	pthread_cond_destroy(&f->cq.cond);
	pthread_mutex_destroy(&f->other_cq.mutex);
	pthread_cond_destroy(&f->other_cq.cond);
	pthread_mutex_destroy(&f->vctx.context.mutex);
	pthread_mutex_destroy(&f->lock);
	return 0;
}

static struct fake *fake_new(TALLOC_CTX *mem_ctx, size_t qcap)
{
	struct fake *f = talloc_zero(mem_ctx, struct fake);
	int fds[2];
	size_t i;

	assert_non_null(f);
	f->queue = talloc_array(f, uint64_t, qcap);
	assert_non_null(f->queue);
	f->qcap = qcap;
	/* blocking, as ibv_create_comp_channel() leaves it */
	assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
	f->wfd = fds[1];
	assert_int_equal(pthread_mutex_init(&f->lock, NULL), 0);

	f->vctx.sz = sizeof(f->vctx);
	f->vctx.context.abi_compat = __VERBS_ABI_IS_EXTENDED;
	f->vctx.context.cmd_fd = -1;
	f->vctx.context.async_fd = -1;
	f->vctx.context.num_comp_vectors = 1;
	f->vctx.context.ops.poll_cq = fake_poll_cq;
	f->vctx.context.ops.req_notify_cq = fake_req_notify_cq;
	assert_int_equal(pthread_mutex_init(&f->vctx.context.mutex, NULL), 0);
	for (i = 0; i < sizeof(f->priv_ops) / sizeof(f->priv_ops[0]); i++) {
		f->priv_ops[i] = fake_cq_event;
	}
	f->vctx.priv = (struct verbs_ex_private *)(void *)f->priv_ops;

	f->channel.context = &f->vctx.context;
	f->channel.fd = fds[0];
	f->channel.refcnt = 2;
	fake_init_cq(f, &f->cq);
	fake_init_cq(f, &f->other_cq);
	talloc_set_destructor(f, fake_destructor);
	return f;
}

static size_t fake_pending(struct fake *f)
{
	size_t n;

	pthread_mutex_lock(&f->lock);
	n = f->qtail - f->qhead;
	pthread_mutex_unlock(&f->lock);
	return n;
}

static unsigned fake_acked(struct ibv_cq *cq)
{
	unsigned n;

	pthread_mutex_lock(&cq->mutex);
	n = cq->comp_events_completed;
	pthread_mutex_unlock(&cq->mutex);
	return n;
}

/* Every event read was acknowledged (after detaching). */
static void check_acks_balanced(struct fake *f)
{
	pthread_mutex_lock(&f->lock);
	assert_int_equal(fake_acked(&f->cq), f->events_read);
	pthread_mutex_unlock(&f->lock);
}

/* While attached: acknowledged in batches, never more than read. */
static void check_acks_batched(struct fake *f)
{
	unsigned acked = fake_acked(&f->cq);

	pthread_mutex_lock(&f->lock);
	assert_true(acked <= f->events_read);
	assert_true(f->events_read - acked < EVPOLL_RDMA_ACK_BATCH);
	pthread_mutex_unlock(&f->lock);
}

#define FAKE_GET(f, field) ({					\
	__typeof__((f)->field) v_;				\
	pthread_mutex_lock(&(f)->lock);				\
	v_ = (f)->field;					\
	pthread_mutex_unlock(&(f)->lock);			\
	v_;							\
})

#define FAKE_SET(f, field, value) do {				\
	pthread_mutex_lock(&(f)->lock);				\
	(f)->field = (value);					\
	pthread_mutex_unlock(&(f)->lock);			\
} while (0)

/* ---------------------------------------------------------------------
 * The handler: records every work completion
 */

struct rec {
	uint64_t n;		/* wr_ids 0 .. n-1 may come */
	uint8_t *seen;
	uint64_t delivered;
	uint64_t target;
	bool done;		/* delivered >= target */
	unsigned calls;
	int max_batch;
	uint64_t next;		/* wr_id expected next, for the order */
	bool in_order;
	bool dup;
	bool bad;
	enum ibv_wc_status want_status;
	/* detach this adapter at call number free_at (1-based) */
	struct evpoll_rdma_cq **free_ptr;
	unsigned free_at;
	/* called after each batch is recorded */
	void (*hook)(struct tevent_context *ev, struct rec *rec);
	void *hook_data;
};

static struct rec *rec_new(TALLOC_CTX *mem_ctx, uint64_t n, uint64_t target)
{
	struct rec *rec = talloc_zero(mem_ctx, struct rec);

	assert_non_null(rec);
	rec->seen = talloc_zero_array(rec, uint8_t, n);
	assert_non_null(rec->seen);
	rec->n = n;
	rec->target = target;
	rec->in_order = true;
	rec->want_status = IBV_WC_SUCCESS;
	return rec;
}

static void rec_handler(struct tevent_context *ev, struct ibv_wc *wc, int n,
			void *private_data)
{
	struct rec *rec = private_data;
	int i;

	rec->calls++;
	if (n < 1 || n > EVPOLL_RDMA_WC_BATCH) {
		rec->bad = true;
	}
	if (n > rec->max_batch) {
		rec->max_batch = n;
	}
	for (i = 0; i < n; i++) {
		uint64_t id = wc[i].wr_id;

		if (wc[i].status != rec->want_status || id >= rec->n) {
			rec->bad = true;
			continue;
		}
		if (rec->seen[id]++ != 0) {
			rec->dup = true;
		}
		if (id != rec->next) {
			rec->in_order = false;
		}
		rec->next = id + 1;
		rec->delivered++;
	}
	rec->done = rec->delivered >= rec->target;
	if (rec->free_ptr != NULL && rec->calls == rec->free_at) {
		TALLOC_FREE(*rec->free_ptr);
	}
	if (rec->hook != NULL) {
		rec->hook(ev, rec);
	}
}

/* wr_ids 0 .. total-1 each delivered exactly once, in order */
static void check_exactly_once(const struct rec *rec, uint64_t total)
{
	uint64_t i;

	assert_false(rec->bad);
	assert_false(rec->dup);
	assert_int_equal(rec->delivered, total);
	for (i = 0; i < total; i++) {
		if (rec->seen[i] != 1) {
			fail_msg("wr_id %llu delivered %u times",
				 (unsigned long long)i, rec->seen[i]);
		}
	}
	assert_true(rec->max_batch <= EVPOLL_RDMA_WC_BATCH);
}

/* ---------------------------------------------------------------------
 * Loop helpers
 */

/* A timer that fires every second, so loop_once never blocks for long. */
struct watchdog {
	struct tevent_timer *te;
};

static void watchdog_fn(struct tevent_context *ev, struct tevent_timer *te,
			struct timeval now, void *private_data)
{
	struct watchdog *w = private_data;

	w->te = tevent_add_timer(ev, w, tevent_timeval_current_ofs(1, 0),
				 watchdog_fn, w);
}

static struct watchdog *watchdog_start(struct tevent_context *ev)
{
	struct watchdog *w = talloc_zero(ev, struct watchdog);

	assert_non_null(w);
	w->te = tevent_add_timer(ev, w, tevent_timeval_current_ofs(1, 0),
				 watchdog_fn, w);
	assert_non_null(w->te);
	return w;
}

static void run_until(struct tevent_context *ev, const bool *done)
{
	struct watchdog *w = watchdog_start(ev);

	tu_loop_until(ev, done, WATCHDOG_SECONDS * 1000);
	talloc_free(w);
}

/* Run the loop while cond holds, with the watchdog. */
#define LOOP_WHILE(ev, cond) do {					\
	struct watchdog *w_ = watchdog_start(ev);			\
	uint64_t deadline_ = tu_now_ns() +				\
		(uint64_t)WATCHDOG_SECONDS * 1000000000ULL;		\
	while (cond) {							\
		assert_int_equal(tevent_loop_once(ev), 0);		\
		if (tu_now_ns() > deadline_) {				\
			fail_msg("still true after %d s: %s",		\
				 WATCHDOG_SECONDS, #cond);		\
		}							\
	}								\
	talloc_free(w_);						\
} while (0)

/* A timer every millisecond, so the loop never blocks for long. */
struct ticker {
	struct tevent_timer *te;
};

static void ticker_fn(struct tevent_context *ev, struct tevent_timer *te,
		      struct timeval now, void *private_data)
{
	struct ticker *t = private_data;

	t->te = tevent_add_timer(ev, t, tevent_timeval_current_ofs(0, 1000),
				 ticker_fn, t);
}

/* Run the loop for about ms milliseconds (no assertion on time). */
static void run_for_ms(struct tevent_context *ev, unsigned ms)
{
	struct ticker *t = talloc_zero(ev, struct ticker);
	uint64_t end = tu_now_ns() + (uint64_t)ms * 1000000ULL;

	assert_non_null(t);
	ticker_fn(ev, NULL, tevent_timeval_current(), t);
	while (tu_now_ns() < end) {
		assert_int_equal(tevent_loop_once(ev), 0);
	}
	talloc_free(t);
}

static bool is_mode(const char *spec, const char *mode)
{
	return strcmp(spec, mode) == 0;
}

/*
 * Let the loop go to sleep: every event on the channel read, and an AUTO
 * loop done spinning. Then the CQ is armed and the next completion finds
 * the loop asleep. Not for ALWAYS, which never sleeps.
 */
static void wait_asleep(struct tevent_context *ev, struct fake *f,
			const char *spec)
{
	assert_false(is_mode(spec, "evpoll-always"));
	LOOP_WHILE(ev, evpoll_is_spinning(ev) ||
		       FAKE_GET(f, events_read) < FAKE_GET(f, events_written));
}

/* After an attach: run its first poll (an immediate), then wait_asleep. */
static void settle(struct tevent_context *ev, struct fake *f,
		   const char *spec)
{
	assert_int_equal(tevent_loop_once(ev), 0);
	if (!is_mode(spec, "evpoll-always")) {
		wait_asleep(ev, f, spec);
	}
}

static const char *const backends[] = {
	"epoll", "evpoll-never", "evpoll-auto", "evpoll-always", NULL,
};

static bool fd_nonblocking(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	assert_int_not_equal(fl, -1);
	return (fl & O_NONBLOCK) != 0;
}

/* ---------------------------------------------------------------------
 * Tests
 */

static void test_args(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "epoll");
	struct fake *f = fake_new(mem, 16);
	struct rec *rec = rec_new(mem, 16, 1);
	struct evpoll_rdma_cq *a;
	struct ibv_comp_channel other = f->channel;

	errno = 0;
	assert_null(evpoll_rdma_cq_attach(NULL, mem, &f->cq, &f->channel,
					  rec_handler, rec));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_rdma_cq_attach(ev, mem, NULL, &f->channel,
					  rec_handler, rec));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_rdma_cq_attach(ev, mem, &f->cq, NULL,
					  rec_handler, rec));
	assert_int_equal(errno, EINVAL);
	errno = 0;
	assert_null(evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  NULL, rec));
	assert_int_equal(errno, EINVAL);
	/* not the CQ's channel */
	errno = 0;
	assert_null(evpoll_rdma_cq_attach(ev, mem, &f->cq, &other,
					  rec_handler, rec));
	assert_int_equal(errno, EINVAL);
	/* a bad fd: fcntl's error */
	other.fd = -1;
	f->cq.channel = &other;
	errno = 0;
	assert_null(evpoll_rdma_cq_attach(ev, mem, &f->cq, &other,
					  rec_handler, rec));
	assert_int_equal(errno, EBADF);
	f->cq.channel = &f->channel;
	/* ibv_req_notify_cq fails: its error, fd flags untouched */
	FAKE_SET(f, notify_error, ENOSPC);
	errno = 0;
	assert_null(evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec));
	assert_int_equal(errno, ENOSPC);
	assert_false(fd_nonblocking(f->channel.fd));
	FAKE_SET(f, notify_error, 0);

	/* a NULL mem_ctx is a talloc top-level context, as usual */
	a = evpoll_rdma_cq_attach(ev, NULL, &f->cq, &f->channel, rec_handler,
				  rec);
	assert_non_null(a);
	talloc_free(a);
	assert_int_equal(rec->calls, 0);
	talloc_free(mem);
}

/*
 * The sleeping path: each completion arrives while the loop sleeps, so it
 * comes through an event on the channel; the CQ is re-armed every time.
 */
static void test_sleep_path(void **state)
{
	const unsigned n = 100;
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		const char *spec = backends[b];
		TALLOC_CTX *mem;
		struct tevent_context *ev;
		struct fake *f;
		struct rec *rec;
		struct evpoll_rdma_cq *a;
		unsigned i;

		if (is_mode(spec, "evpoll-always")) {
			continue;	/* never sleeps: test_spin_path */
		}
		mem = talloc_new(NULL);
		ev = tu_context(mem, spec);
		f = fake_new(mem, 64);
		rec = rec_new(mem, n, 0);
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		assert_true(fd_nonblocking(f->channel.fd));
		settle(ev, f, spec);
		assert_int_equal(FAKE_GET(f, arms), 1);

		for (i = 0; i < n; i++) {
			rec->target = i + 1;
			rec->done = false;
			fake_complete(f, 1);
			/* the loop sleeps on an armed CQ: an event per one */
			assert_int_equal(FAKE_GET(f, events_written), i + 1);
			run_until(ev, &rec->done);
			check_acks_batched(f);
			wait_asleep(ev, f, spec);
		}
		check_exactly_once(rec, n);
		assert_true(rec->in_order);
		assert_int_equal(FAKE_GET(f, events_read), n);
		assert_int_equal(FAKE_GET(f, arms), n + 1);
		assert_int_equal(FAKE_GET(f, arms_while_armed), 0);
		assert_int_equal(fake_acked(&f->cq),
				 n / EVPOLL_RDMA_ACK_BATCH *
				 EVPOLL_RDMA_ACK_BATCH);
		talloc_free(a);
		check_acks_balanced(f);
		assert_false(fd_nonblocking(f->channel.fd));
		talloc_free(mem);
	}
}

/*
 * The spinning path: attached to a loop that spins, the CQ is never armed
 * and no event is raised; the poll callback delivers everything.
 */
static void test_spin_path(void **state)
{
	const char *const specs[] = { "evpoll-always", "evpoll-auto", NULL };
	const unsigned bursts = 50;
	int s;

	for (s = 0; specs[s] != NULL; s++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context(mem, specs[s]);
		struct fake *f = fake_new(mem, 256);
		struct rec *rec = rec_new(mem, bursts * 40 + 1, 0);
		struct evpoll_rdma_cq *a;
		struct evpoll_stats st;
		unsigned i, total = 0;

		/* a pin keeps an AUTO loop spinning */
		evpoll_pin(ev);
		assert_int_equal(tevent_loop_once(ev), 0);
		assert_true(evpoll_is_spinning(ev));
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		for (i = 0; i < bursts; i++) {
			unsigned k = 1 + (i * 7) % 40;

			fake_complete(f, k);
			total += k;
			rec->target = total;
			rec->done = false;
			run_until(ev, &rec->done);
		}
		check_exactly_once(rec, total);
		assert_true(rec->in_order);
		assert_int_equal(FAKE_GET(f, arms), 0);
		assert_int_equal(FAKE_GET(f, events_written), 0);
		assert_int_equal(evpoll_get_stats(ev, &st), 0);
		assert_true(st.poll_work > 0);

		if (is_mode(specs[s], "evpoll-auto")) {
			/* the spin ends: the exit callback arms */
			evpoll_unpin(ev);
			wait_asleep(ev, f, specs[s]);
			assert_int_equal(FAKE_GET(f, arms), 1);
			/* and the next completion comes by the channel */
			fake_complete(f, 1);
			assert_int_equal(FAKE_GET(f, events_written), 1);
			rec->target = ++total;
			rec->done = false;
			run_until(ev, &rec->done);
			check_exactly_once(rec, total);
		}
		talloc_free(a);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/*
 * AUTO mode across the switch, in rounds of four bursts: pinned (the
 * loop spins; the CQ may still be armed from before), pinned again (now
 * unarmed: no event), asleep (armed: an event), and right after the last
 * delivery without waiting (whatever the loop is doing).
 */
static void test_auto_switch(void **state)
{
	const unsigned rounds = 60;
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "evpoll-auto");
	struct fake *f = fake_new(mem, 256);
	struct rec *rec = rec_new(mem, rounds * 50, 0);
	struct evpoll_rdma_cq *a;
	struct evpoll_stats st;
	unsigned i, total = 0;

	a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel, rec_handler,
				  rec);
	assert_non_null(a);
	settle(ev, f, "evpoll-auto");
	for (i = 0; i < rounds; i++) {
		unsigned k = 1 + (i * 13) % 50;
		unsigned written = FAKE_GET(f, events_written);

		switch (i % 4) {
		case 0:
			evpoll_pin(ev);
			fake_complete(f, k);
			break;
		case 1:
			assert_true(evpoll_is_spinning(ev));
			fake_complete(f, k);
			/* spinning: not re-armed, so no event */
			assert_int_equal(FAKE_GET(f, events_written),
					 written);
			break;
		case 2:
			wait_asleep(ev, f, "evpoll-auto");
			assert_true(FAKE_GET(f, armed));
			written = FAKE_GET(f, events_written);
			fake_complete(f, k);
			assert_int_equal(FAKE_GET(f, events_written),
					 written + 1);
			break;
		case 3:
			fake_complete(f, k);
			break;
		}
		total += k;
		rec->target = total;
		rec->done = false;
		run_until(ev, &rec->done);
		check_acks_batched(f);
		if (i % 4 == 1) {
			evpoll_unpin(ev);
		}
	}
	check_exactly_once(rec, total);
	assert_true(rec->in_order);
	/* both paths ran */
	assert_true(FAKE_GET(f, events_read) > 0);
	assert_int_equal(evpoll_get_stats(ev, &st), 0);
	assert_true(st.poll_work > 0);
	assert_int_equal(FAKE_GET(f, arms_while_armed), 0);
	/* every event written is read */
	wait_asleep(ev, f, "evpoll-auto");
	talloc_free(a);
	check_acks_balanced(f);
	talloc_free(mem);
}

/*
 * The re-arm race on the channel path: a completion lands after the
 * adapter saw the CQ empty but before its arm took effect, so it raises no
 * event. The poll after the arm must deliver it, in the same dispatch.
 */
static void test_rearm_race_fd(void **state)
{
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		const char *spec = backends[b];
		TALLOC_CTX *mem;
		struct tevent_context *ev;
		struct fake *f;
		struct rec *rec;
		struct evpoll_rdma_cq *a;
		unsigned r;

		if (is_mode(spec, "evpoll-always")) {
			continue;	/* never arms: test_rearm_race_exit */
		}
		mem = talloc_new(NULL);
		ev = tu_context(mem, spec);
		f = fake_new(mem, 64);
		rec = rec_new(mem, 64, 0);
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		settle(ev, f, spec);

		for (r = 0; r < 10; r++) {
			FAKE_SET(f, race_before_arm, 1);
			fake_complete(f, 1);
			assert_int_equal(FAKE_GET(f, events_written), r + 1);
			/*
			 * One iteration: the event's fd handler delivers the
			 * first, arms (the fake slips the second in first),
			 * polls again and delivers the second. Had it not
			 * polled after the arm, nothing would ever wake the
			 * loop for the second.
			 */
			assert_int_equal(tevent_loop_once(ev), 0);
			assert_int_equal(rec->delivered, 2 * (r + 1));
			assert_int_equal(FAKE_GET(f, race_before_arm), 0);
			assert_int_equal(FAKE_GET(f, events_written), r + 1);
			wait_asleep(ev, f, spec);
			assert_true(FAKE_GET(f, armed));
		}
		check_exactly_once(rec, 20);
		assert_true(rec->in_order);
		assert_int_equal(FAKE_GET(f, events_read), 10);
		assert_int_equal(FAKE_GET(f, arms_while_armed), 0);
		talloc_free(a);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/*
 * The other side of the race: a completion lands just after the arm. It
 * raises an event, and the poll after the arm already takes it; the event
 * then finds nothing. Still exactly once.
 */
static void test_rearm_race_after_arm(void **state)
{
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		const char *spec = backends[b];
		TALLOC_CTX *mem;
		struct tevent_context *ev;
		struct fake *f;
		struct rec *rec;
		struct evpoll_rdma_cq *a;
		unsigned r;

		if (is_mode(spec, "evpoll-always")) {
			continue;
		}
		mem = talloc_new(NULL);
		ev = tu_context(mem, spec);
		f = fake_new(mem, 64);
		rec = rec_new(mem, 64, 0);
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		settle(ev, f, spec);

		for (r = 0; r < 10; r++) {
			FAKE_SET(f, race_after_arm, 1);
			fake_complete(f, 1);
			assert_int_equal(tevent_loop_once(ev), 0);
			/* the poll after the arm took the second at once */
			assert_int_equal(rec->delivered, 2 * (r + 1));
			assert_int_equal(FAKE_GET(f, events_written),
					 2 * (r + 1));
			/* its event is pending: reading it finds nothing */
			wait_asleep(ev, f, spec);
			assert_int_equal(rec->delivered, 2 * (r + 1));
			assert_true(FAKE_GET(f, armed));
		}
		check_exactly_once(rec, 20);
		assert_true(rec->in_order);
		assert_int_equal(FAKE_GET(f, events_read), 20);
		assert_int_equal(FAKE_GET(f, arms_while_armed), 0);
		talloc_free(a);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/*
 * The re-arm race when a spin ends: the exit callback arms, the fake slips
 * a completion in before the arm, and the exit callback's poll after the
 * arm must deliver it before the loop may sleep. AUTO ends the spin by
 * timing out, ALWAYS by a switch to NEVER.
 */
static void test_rearm_race_exit(void **state)
{
	const char *const specs[] = { "evpoll-auto", "evpoll-always", NULL };
	int s;

	for (s = 0; specs[s] != NULL; s++) {
		const char *spec = specs[s];
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context(mem, spec);
		struct fake *f = fake_new(mem, 64);
		struct rec *rec = rec_new(mem, 64, 0);
		struct evpoll_rdma_cq *a;
		struct evpoll_config cfg;
		unsigned r;

		/* attach while spinning: the CQ starts unarmed */
		evpoll_pin(ev);
		assert_int_equal(tevent_loop_once(ev), 0);
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		assert_int_equal(evpoll_get_config(ev, &cfg), 0);

		for (r = 0; r < 10; r++) {
			struct evpoll_stats before, after;
			unsigned written;

			/* a completion while spinning (pinned) */
			fake_complete(f, 1);
			rec->target = 2 * r + 1;
			rec->done = false;
			run_until(ev, &rec->done);
			/* an event it raised (CQ armed last round) is read */
			LOOP_WHILE(ev, FAKE_GET(f, events_read) <
				       FAKE_GET(f, events_written));
			assert_true(evpoll_is_spinning(ev));
			assert_false(FAKE_GET(f, armed));
			written = FAKE_GET(f, events_written);

			FAKE_SET(f, race_before_arm, 1);
			evpoll_unpin(ev);
			if (is_mode(spec, "evpoll-auto")) {
				/* the spin times out: exit callback */
				LOOP_WHILE(ev, evpoll_is_spinning(ev));
			} else {
				/* leaving spin mode runs the exit callback */
				cfg.mode = EVPOLL_MODE_NEVER;
				assert_int_equal(evpoll_set_config(ev, &cfg),
						 0);
				assert_false(evpoll_is_spinning(ev));
			}
			/* delivered by the exit callback itself */
			assert_int_equal(rec->delivered, 2 * r + 2);
			assert_int_equal(FAKE_GET(f, race_before_arm), 0);
			assert_true(FAKE_GET(f, armed));
			assert_int_equal(FAKE_GET(f, events_written), written);

			/* spin again */
			if (!is_mode(spec, "evpoll-auto")) {
				cfg.mode = EVPOLL_MODE_ALWAYS;
				assert_int_equal(evpoll_set_config(ev, &cfg),
						 0);
			}
			evpoll_pin(ev);
			assert_int_equal(evpoll_get_stats(ev, &before), 0);
			assert_int_equal(tevent_loop_once(ev), 0);
			assert_int_equal(evpoll_get_stats(ev, &after), 0);
			assert_int_equal(after.spin_entries,
					 before.spin_entries + 1);
		}
		check_exactly_once(rec, 20);
		assert_true(rec->in_order);
		assert_int_equal(FAKE_GET(f, arms_while_armed), 0);
		talloc_free(a);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/*
 * Many completions at once: delivered in batches of at most
 * EVPOLL_RDMA_WC_BATCH, at most EVPOLL_RDMA_BUDGET per loop iteration.
 */
static void test_budget(void **state)
{
	const unsigned n = 1000;
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context(mem, backends[b]);
		struct fake *f = fake_new(mem, n);
		struct rec *rec = rec_new(mem, n, n);
		struct evpoll_rdma_cq *a;
		struct watchdog *w;
		uint64_t deadline;

		/* queued before the attach: the first poll finds them */
		fake_complete(f, n);
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		w = watchdog_start(ev);
		deadline = tu_now_ns() +
			   (uint64_t)WATCHDOG_SECONDS * 1000000000ULL;
		while (!rec->done) {
			unsigned before = rec->calls;

			assert_int_equal(tevent_loop_once(ev), 0);
			assert_true(rec->calls - before <=
				    EVPOLL_RDMA_BUDGET / EVPOLL_RDMA_WC_BATCH);
			if (tu_now_ns() > deadline) {
				fail_msg("%llu of %u delivered",
					 (unsigned long long)rec->delivered,
					 n);
			}
		}
		talloc_free(w);
		check_exactly_once(rec, n);
		assert_true(rec->in_order);
		assert_int_equal(rec->max_batch, EVPOLL_RDMA_WC_BATCH);
		assert_int_equal(FAKE_GET(f, events_written), 0);
		talloc_free(a);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/*
 * The handler detaches the adapter in its first call, on every path: no
 * further call, the rest stays in the CQ, acks balanced, flags restored.
 */
enum detach_path { DETACH_FIRST_POLL, DETACH_FD, DETACH_SPIN, DETACH_EXIT };

static void detach_case(const char *spec, enum detach_path path)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, spec);
	struct fake *f = fake_new(mem, 64);
	struct rec *rec = rec_new(mem, 64, 1);
	struct evpoll_rdma_cq *a;
	struct evpoll_config cfg;
	size_t expect_left = 0;

	if (path == DETACH_FIRST_POLL) {
		fake_complete(f, 40);
		expect_left = 40 - EVPOLL_RDMA_WC_BATCH;
	}
	if (path == DETACH_SPIN || path == DETACH_EXIT) {
		evpoll_pin(ev);
		assert_int_equal(tevent_loop_once(ev), 0);
	}
	a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel, rec_handler,
				  rec);
	assert_non_null(a);
	rec->free_ptr = &a;
	rec->free_at = 1;

	switch (path) {
	case DETACH_FIRST_POLL:
		run_until(ev, &rec->done);
		break;
	case DETACH_FD:
		settle(ev, f, spec);
		fake_complete(f, 40);
		expect_left = 40 - EVPOLL_RDMA_WC_BATCH;
		assert_int_equal(FAKE_GET(f, events_written), 1);
		run_until(ev, &rec->done);
		break;
	case DETACH_SPIN:
		assert_int_equal(tevent_loop_once(ev), 0);
		fake_complete(f, 40);
		expect_left = 40 - EVPOLL_RDMA_WC_BATCH;
		assert_int_equal(FAKE_GET(f, events_written), 0);
		run_until(ev, &rec->done);
		evpoll_unpin(ev);
		break;
	case DETACH_EXIT:
		assert_int_equal(tevent_loop_once(ev), 0);
		evpoll_unpin(ev);
		FAKE_SET(f, race_before_arm, 1);
		assert_int_equal(evpoll_get_config(ev, &cfg), 0);
		cfg.mode = EVPOLL_MODE_NEVER;
		assert_int_equal(evpoll_set_config(ev, &cfg), 0);
		assert_true(rec->done);
		break;
	}
	assert_null(a);
	assert_int_equal(rec->calls, 1);
	/* more completions: nobody delivers them */
	fake_complete(f, 3);
	expect_left += 3;
	run_for_ms(ev, 5);
	assert_int_equal(rec->calls, 1);
	assert_int_equal(fake_pending(f), expect_left);
	check_acks_balanced(f);
	assert_false(fd_nonblocking(f->channel.fd));
	talloc_free(mem);
}

static void test_detach_in_handler(void **state)
{
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		detach_case(backends[b], DETACH_FIRST_POLL);
		if (!is_mode(backends[b], "evpoll-always")) {
			detach_case(backends[b], DETACH_FD);
		}
	}
	detach_case("evpoll-always", DETACH_SPIN);
	detach_case("evpoll-auto", DETACH_SPIN);
	detach_case("evpoll-always", DETACH_EXIT);
	detach_case("evpoll-auto", DETACH_EXIT);
}

/* Detach with unacknowledged events and an unread event on the channel. */
static void test_detach_acks(void **state)
{
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		const char *spec = backends[b];
		TALLOC_CTX *mem;
		struct tevent_context *ev;
		struct fake *f;
		struct rec *rec;
		struct evpoll_rdma_cq *a;
		unsigned i;

		if (is_mode(spec, "evpoll-always")) {
			continue;
		}
		mem = talloc_new(NULL);
		ev = tu_context(mem, spec);
		f = fake_new(mem, 64);
		rec = rec_new(mem, 64, 0);
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		settle(ev, f, spec);
		/* fewer events than a batch: none acknowledged yet */
		for (i = 0; i < EVPOLL_RDMA_ACK_BATCH - 1; i++) {
			fake_complete(f, 1);
			rec->target = i + 1;
			rec->done = false;
			run_until(ev, &rec->done);
			wait_asleep(ev, f, spec);
		}
		assert_int_equal(FAKE_GET(f, events_read),
				 EVPOLL_RDMA_ACK_BATCH - 1);
		assert_int_equal(fake_acked(&f->cq), 0);
		/* one more event, left unread */
		fake_complete(f, 1);
		talloc_free(a);
		assert_int_equal(FAKE_GET(f, events_read),
				 EVPOLL_RDMA_ACK_BATCH - 1);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/* The channel fd's flags: restored only if the adapter changed them. */
static void test_fd_flags(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "epoll");
	struct fake *f = fake_new(mem, 16);
	struct rec *rec = rec_new(mem, 16, 1);
	struct evpoll_rdma_cq *a;
	int fl;

	assert_false(fd_nonblocking(f->channel.fd));
	a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel, rec_handler,
				  rec);
	assert_non_null(a);
	assert_true(fd_nonblocking(f->channel.fd));
	talloc_free(a);
	assert_false(fd_nonblocking(f->channel.fd));

	fl = fcntl(f->channel.fd, F_GETFL);
	assert_int_equal(fcntl(f->channel.fd, F_SETFL, fl | O_NONBLOCK), 0);
	a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel, rec_handler,
				  rec);
	assert_non_null(a);
	talloc_free(a);
	assert_true(fd_nonblocking(f->channel.fd));
	talloc_free(mem);
}

/* The tevent context goes first; the adapters stay safe to free. */
static void test_context_freed_first(void **state)
{
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		const char *spec = backends[b];
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context(NULL, spec);
		struct fake *f = fake_new(mem, 64);
		struct fake *f2 = fake_new(mem, 64);
		struct rec *rec = rec_new(mem, 64, 3);
		struct evpoll_rdma_cq *a, *child;
		unsigned i;

		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		/* a second adapter owned by the context itself */
		child = evpoll_rdma_cq_attach(ev, ev, &f2->cq, &f2->channel,
					      rec_handler, rec);
		assert_non_null(child);
		settle(ev, f, spec);
		for (i = 0; i < 3; i++) {
			fake_complete(f, 1);
			rec->target = i + 1;
			rec->done = false;
			run_until(ev, &rec->done);
			if (!is_mode(spec, "evpoll-always")) {
				wait_asleep(ev, f, spec);
			}
		}
		talloc_free(ev);	/* frees child */
		check_acks_balanced(f2);
		assert_false(fd_nonblocking(f2->channel.fd));
		fake_complete(f, 1);
		talloc_free(a);
		check_acks_balanced(f);
		assert_false(fd_nonblocking(f->channel.fd));
		assert_int_equal(rec->delivered, 3);
		talloc_free(mem);
	}
}

/*
 * The channel carries an event of another CQ: acknowledged (so that CQ's
 * destroy does not hang), reported, dropped.
 */
static void test_foreign_event(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "epoll");
	struct fake *f = fake_new(mem, 16);
	struct rec *rec = rec_new(mem, 16, 1);
	struct evpoll_rdma_cq *a;
	struct tu_debug_log log;

	tu_capture_debug(ev, &log);
	a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel, rec_handler,
				  rec);
	assert_non_null(a);
	settle(ev, f, "epoll");
	pthread_mutex_lock(&f->lock);
	fake_write_event_locked(f, &f->other_cq);
	pthread_mutex_unlock(&f->lock);
	assert_int_equal(tevent_loop_once(ev), 0);
	assert_int_equal(FAKE_GET(f, other_events_read), 1);
	assert_int_equal(fake_acked(&f->other_cq), 1);
	assert_non_null(strstr(log.text, "another CQ"));
	/* ours still work */
	fake_complete(f, 1);
	run_until(ev, &rec->done);
	check_exactly_once(rec, 1);
	talloc_free(a);
	check_acks_balanced(f);
	talloc_free(mem);
}

/*
 * Provider errors: a failing poll is reported once and treated as empty;
 * a failing re-arm is reported; a dead channel (end of file) is reported
 * and no longer watched, so it cannot spin the loop.
 */
static void test_errors(void **state)
{
	TALLOC_CTX *mem = talloc_new(NULL);
	struct tevent_context *ev = tu_context(mem, "epoll");
	struct fake *f = fake_new(mem, 16);
	struct rec *rec = rec_new(mem, 16, 0);
	struct evpoll_rdma_cq *a;
	struct tu_debug_log log;
	unsigned count;

	tu_capture_debug(ev, &log);
	a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel, rec_handler,
				  rec);
	assert_non_null(a);
	settle(ev, f, "epoll");

	/* poll_cq fails (before and after the re-arm): nothing delivered */
	FAKE_SET(f, poll_errors, 2);
	fake_complete(f, 1);
	assert_int_equal(tevent_loop_once(ev), 0);
	assert_int_equal(rec->delivered, 0);
	assert_int_equal(FAKE_GET(f, poll_errors), 0);
	assert_non_null(strstr(log.text, "ibv_poll_cq failed"));
	/* re-armed anyway: the next event brings both */
	rec->target = 2;
	fake_complete(f, 1);
	run_until(ev, &rec->done);
	check_exactly_once(rec, 2);

	/* re-arming fails: reported */
	FAKE_SET(f, notify_error, EIO);
	fake_complete(f, 1);
	rec->target = 3;
	rec->done = false;
	run_until(ev, &rec->done);
	assert_non_null(strstr(log.text, "ibv_req_notify_cq failed"));
	FAKE_SET(f, notify_error, 0);

	/* end of file on the channel */
	close(f->wfd);
	f->wfd = -1;
	assert_int_equal(tevent_loop_once(ev), 0);
	assert_non_null(strstr(log.text, "no longer watching"));
	/* no longer readable as far as the loop is concerned */
	count = log.count;
	run_for_ms(ev, 3);
	assert_int_equal(log.count, count);
	check_exactly_once(rec, 3);
	talloc_free(a);
	check_acks_balanced(f);
	talloc_free(mem);
}

/*
 * The handler runs a nested loop that waits for a later completion: it is
 * delivered inside, although the CQ is unarmed at that moment (channel
 * path) or the poll callback is not re-entered (spinning path).
 */
static void nested_hook(struct tevent_context *ev, struct rec *rec)
{
	struct fake *f = rec->hook_data;

	if (rec->calls != 1) {
		return;
	}
	/* the next completion arrives while we wait for it */
	fake_complete(f, 1);
	rec->target = 2;
	rec->done = false;
	run_until(ev, &rec->done);
}

static void test_nested_loop(void **state)
{
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		const char *spec = backends[b];
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context(mem, spec);
		struct fake *f = fake_new(mem, 16);
		struct rec *rec = rec_new(mem, 16, 1);
		struct evpoll_rdma_cq *a;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
		tevent_loop_allow_nesting(ev);
#pragma GCC diagnostic pop
		rec->hook = nested_hook;
		rec->hook_data = f;
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		settle(ev, f, spec);
		fake_complete(f, 1);
		run_until(ev, &rec->done);
		assert_int_equal(rec->calls, 2);
		check_exactly_once(rec, 2);
		/* afterwards the loop sleeps and wakes as before */
		if (!is_mode(spec, "evpoll-always")) {
			wait_asleep(ev, f, spec);
			assert_true(FAKE_GET(f, armed));
		}
		rec->target = 3;
		rec->done = false;
		fake_complete(f, 1);
		run_until(ev, &rec->done);
		check_exactly_once(rec, 3);
		talloc_free(a);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/*
 * A producer thread completes work at its own pace, with pauses long
 * enough for an AUTO loop to fall asleep: every completion delivered
 * exactly once, whatever the interleaving.
 */
struct producer {
	struct fake *f;
	unsigned total;
	unsigned seed;
};

static void *producer_main(void *arg)
{
	struct producer *p = arg;
	unsigned done = 0;

	while (done < p->total) {
		unsigned k = 1 + rand_r(&p->seed) % 24;
		unsigned pause = rand_r(&p->seed) % 8;

		if (k > p->total - done) {
			k = p->total - done;
		}
		fake_complete(p->f, k);
		done += k;
		if (pause == 0) {
			struct timespec ts = { 0, 400 * 1000 };

			nanosleep(&ts, NULL);
		} else if (pause == 1) {
			sched_yield();
		}
	}
	return NULL;
}

static void test_threaded_producer(void **state)
{
	int b;

	for (b = 0; backends[b] != NULL; b++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context(mem, backends[b]);
		unsigned total = (unsigned)tu_scale(20000);
		struct fake *f = fake_new(mem, total);
		struct rec *rec = rec_new(mem, total, total);
		struct producer p = { .f = f, .total = total, .seed = 7 + b };
		struct evpoll_rdma_cq *a;
		pthread_t t;

		if (evpoll_is_evpoll(ev)) {
			struct evpoll_config cfg;

			/* shorter spins: more switches */
			assert_int_equal(evpoll_get_config(ev, &cfg), 0);
			cfg.spin_ns = 50000;
			assert_int_equal(evpoll_set_config(ev, &cfg), 0);
		}
		a = evpoll_rdma_cq_attach(ev, mem, &f->cq, &f->channel,
					  rec_handler, rec);
		assert_non_null(a);
		assert_int_equal(pthread_create(&t, NULL, producer_main, &p),
				 0);
		run_until(ev, &rec->done);
		assert_int_equal(pthread_join(t, NULL), 0);
		check_exactly_once(rec, total);
		assert_true(rec->in_order);
		check_acks_batched(f);
		talloc_free(a);
		check_acks_balanced(f);
		talloc_free(mem);
	}
}

/*
 * With a real device: a QP moved to the error state completes every
 * receive posted to it with IBV_WC_WR_FLUSH_ERR, which needs no peer.
 */
static void test_real_device(void **state)
{
	struct ibv_device **list;
	struct ibv_context *ctx;
	struct ibv_comp_channel *ch;
	struct ibv_cq *cq;
	struct ibv_pd *pd;
	struct ibv_qp *qp;
	struct ibv_qp_init_attr init = {
		.qp_type = IBV_QPT_RC,
		.cap = {
			.max_send_wr = 1, .max_recv_wr = 32,
			.max_send_sge = 1, .max_recv_sge = 1,
		},
	};
	struct ibv_qp_attr attr = { .qp_state = IBV_QPS_ERR };
	int num = 0;
	int b;

	list = ibv_get_device_list(&num);
	if (list == NULL || num == 0) {
		if (list != NULL) {
			ibv_free_device_list(list);
		}
		print_message("no RDMA device found: real-device test "
			      "SKIPPED\n");
		skip();
	}
	ctx = ibv_open_device(list[0]);
	if (ctx == NULL) {
		print_message("cannot open RDMA device %s (%s): real-device "
			      "test SKIPPED\n", ibv_get_device_name(list[0]),
			      strerror(errno));
		ibv_free_device_list(list);
		skip();
	}
	print_message("real-device test on %s\n",
		      ibv_get_device_name(list[0]));
	ch = ibv_create_comp_channel(ctx);
	assert_non_null(ch);
	cq = ibv_create_cq(ctx, 64, NULL, ch, 0);
	assert_non_null(cq);
	pd = ibv_alloc_pd(ctx);
	assert_non_null(pd);
	init.send_cq = cq;
	init.recv_cq = cq;
	qp = ibv_create_qp(pd, &init);
	assert_non_null(qp);
	assert_int_equal(ibv_modify_qp(qp, &attr, IBV_QP_STATE), 0);

	for (b = 0; backends[b] != NULL; b++) {
		TALLOC_CTX *mem = talloc_new(NULL);
		struct tevent_context *ev = tu_context(mem, backends[b]);
		struct rec *rec = rec_new(mem, 16, 16);
		struct evpoll_rdma_cq *a;
		unsigned i;

		rec->want_status = IBV_WC_WR_FLUSH_ERR;
		a = evpoll_rdma_cq_attach(ev, mem, cq, ch, rec_handler, rec);
		assert_non_null(a);
		assert_int_equal(tevent_loop_once(ev), 0);
		if (is_mode(backends[b], "evpoll-auto")) {
			LOOP_WHILE(ev, evpoll_is_spinning(ev));
		}
		for (i = 0; i < 16; i++) {
			struct ibv_recv_wr wr = { .wr_id = i }, *bad = NULL;

			assert_int_equal(ibv_post_recv(qp, &wr, &bad), 0);
		}
		run_until(ev, &rec->done);
		check_exactly_once(rec, 16);
		talloc_free(a);
		talloc_free(mem);
	}
	/* would wait forever on an unacknowledged event */
	assert_int_equal(ibv_destroy_qp(qp), 0);
	assert_int_equal(ibv_dealloc_pd(pd), 0);
	assert_int_equal(ibv_destroy_cq(cq), 0);
	assert_int_equal(ibv_destroy_comp_channel(ch), 0);
	assert_int_equal(ibv_close_device(ctx), 0);
	ibv_free_device_list(list);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_args),
		cmocka_unit_test(test_sleep_path),
		cmocka_unit_test(test_spin_path),
		cmocka_unit_test(test_auto_switch),
		cmocka_unit_test(test_rearm_race_fd),
		cmocka_unit_test(test_rearm_race_after_arm),
		cmocka_unit_test(test_rearm_race_exit),
		cmocka_unit_test(test_budget),
		cmocka_unit_test(test_detach_in_handler),
		cmocka_unit_test(test_detach_acks),
		cmocka_unit_test(test_fd_flags),
		cmocka_unit_test(test_context_freed_first),
		cmocka_unit_test(test_foreign_event),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_nested_loop),
		cmocka_unit_test(test_threaded_producer),
		cmocka_unit_test(test_real_device),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
