/*
 * evpoll_uring: io_uring completions delivered on a tevent loop.
 *
 * Two paths deliver CQEs to the handler:
 *
 * - the eventfd path, on any loop: an eventfd registered on the ring and
 *   watched by a tevent_fd; its handler reads (drains) the eventfd, then
 *   reaps the completion queue;
 * - the poll path, while an evpoll loop spins: a poll callback reaps the
 *   completion queue on every pass. The enter callback mutes the eventfd
 *   (IORING_CQ_EVENTFD_DISABLED) so the kernel does not signal it for
 *   CQEs the poll will find anyway; the exit callback re-enables it and
 *   drains the queue before the loop may sleep.
 *
 * Exactly once. Every reap (poll, fd handler, exit drain) goes through
 * deliver(), which copies one CQE, advances the ring's CQ head past it
 * (io_uring_cq_advance(ring, 1): "seen"), and only then calls the handler
 * with the copy. A CQE is therefore consumed exactly once, by whoever
 * advanced the head past it, and handed to exactly one handler call, even
 * if that handler runs a nested loop that reaps again, or frees the
 * adapter (then the reap stops at once and touches neither the adapter
 * nor the ring again: the CQEs after the one delivered are still in the
 * ring, for the caller). The
 * batch that io_uring_peek_batch_cqe() returns (one acquire load of the
 * tail for up to REAP_BATCH CQEs; it also flushes overflowed CQEs and runs
 * pending task work when the queue is empty) is re-read whenever the head
 * moved under us during a handler call (a nested reap). The per-CQE
 * advance is one release store to the head, a cache line the kernel reads
 * only when its cached view of the free space runs out; the copy is 16
 * bytes (32 for IORING_SETUP_CQE32).
 *
 * Nested loops. A handler may run a nested tevent loop and wait in it for
 * another CQE of this ring, one that is perhaps already in the queue. The
 * eventfd was drained (or is muted while spinning) and evpoll does not
 * re-enter a running poll callback, so nothing would deliver it. While the
 * outermost delivery calls handlers, a tevent immediate is therefore
 * scheduled (a list insert, no syscall; cancelled when the delivery ends).
 * It runs only in a nested iteration, once: it delivers what is in the
 * queue and un-mutes the eventfd (as the exit callback does, see
 * poll_exit()), so later CQEs reach the nested loop through the eventfd
 * handler, in turn with its other events; it does not reschedule itself,
 * which would starve the nested loop's fds and timers. The eventfd is
 * muted again when the outermost delivery ends, if the loop still spins.
 *
 * No CQE lost: see poll_exit() for the switch from spinning to sleeping,
 * evpoll_uring_attach() for CQEs that were in the ring before the eventfd
 * existed, and fd_handler() for the sleeping path.
 *
 * Threads: everything here runs on the thread that owns the tevent
 * context; the only other party is the kernel, which writes CQEs and the
 * CQ tail and reads the CQ head and the CQ flags.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "evpoll.h"
#include "evpoll_uring.h"
#include "asym.h"
#include "visibility.h"

/* CQEs taken from one io_uring_peek_batch_cqe() call */
#define REAP_BATCH 32U
/*
 * CQEs one poll pass, fd handler run or exit drain delivers at most, so a
 * flood of completions cannot starve the loop's other events. What is left
 * is picked up by the next pass, or by the next iteration after the
 * adapter signals its own eventfd.
 */
#define REAP_BUDGET 256U

/* A delivery in progress; its handler may free the adapter. */
struct uring_frame {
	struct uring_frame *prev;
	bool freed;
};

/* Hung on the tevent context: tells the adapter the context is gone. */
struct uring_watch {
	struct evpoll_uring *u;
};

enum reap_path { PATH_POLL, PATH_EVENTFD, PATH_DRAIN };

struct evpoll_uring {
	struct tevent_context *ev;	/* NULL once the context is freed */
	struct io_uring *ring;
	evpoll_cqe_fn handler;
	void *private_data;

	int efd;
	bool registered;		/* efd is registered on the ring */
	struct tevent_fd *fde;
	struct evpoll_poll *poll;	/* NULL on a non-evpoll context */
	struct uring_watch *watch;	/* child of ev */
	struct uring_frame *frames;	/* deliveries in progress */
	struct tevent_immediate *nest_im;	/* see "Nested loops" */

	bool can_mute;		/* kernel has CQ flags (5.8+) */
	bool muted;		/* we set IORING_CQ_EVENTFD_DISABLED */
	bool entered;		/* spinning: after enter, before exit */
	bool detaching;		/* inside the destructor */
	bool defer_taskrun;	/* completions need io_uring_get_events() */
	bool taskrun_flag;	/* ... and IORING_SQ_TASKRUN says when */

	bool pin_inflight;
	bool pinned;		/* we hold one evpoll_pin() on ev */
	uint64_t inflight;

	struct evpoll_uring_stats stats;
};

/* ---- memory ordering of the switch from spinning to sleeping ------------- */

/*
 * A full barrier between our store that re-enables the eventfd and our
 * loads of the CQ tail, which also covers the other side of the race.
 *
 * The kernel posts a CQE by writing it, publishing the CQ tail (release
 * store) and then reading the CQ flags (READ_ONCE) to decide whether to
 * signal the eventfd. When the CQE is posted by this thread (task work
 * that runs on our return from a syscall, IORING_SETUP_DEFER_TASKRUN work
 * run by io_uring_get_events(), NOPs completed inside io_uring_submit())
 * program order already separates it from our re-enable. When another CPU
 * posts it (an io-wq worker, a task sending IORING_OP_MSG_RING), nothing
 * in that kernel path orders its tail store before its flag load: a CPU
 * may satisfy the load early, from before our re-enable, while its tail
 * store is still in its store buffer, invisible to our drain (the
 * "store buffering" pattern; x86 allows it). membarrier(2)
 * PRIVATE_EXPEDITED makes every CPU running a thread of this process
 * (io-wq workers and SQPOLL threads are such threads) execute a full
 * barrier before it returns: the poster's flag load then either comes
 * after that barrier and sees our re-enable (it signals), or comes before
 * it, and then so does its earlier tail store, which our drain, after the
 * membarrier, sees. Without membarrier (old kernel, seccomp) a local
 * seq_cst fence is the best we can do; a MSG_RING sent by another process
 * is not covered either way (see evpoll_uring(3)). Cost: about 1-2 us, once
 * per transition to sleep, which itself costs 25 us or more.
 */
static void full_barrier(void)
{
	asym_heavy_barrier(asym_init());
}

/* ---- small helpers ------------------------------------------------------- */

static void frames_freed(struct uring_frame *top)
{
	for (; top != NULL; top = top->prev) {
		top->freed = true;
	}
}

/* Make the eventfd readable: the loop comes back at its next iteration. */
static void self_signal(struct evpoll_uring *u)
{
	uint64_t one = 1;
	ssize_t n;

	do {
		n = write(u->efd, &one, sizeof(one));
	} while (n == -1 && errno == EINTR);
	/* EAGAIN: the counter is at its maximum, so it is readable anyway */
}

static void drain_eventfd(struct evpoll_uring *u)
{
	uint64_t v;
	ssize_t n;

	do {
		n = read(u->efd, &v, sizeof(v));
	} while (n == -1 && errno == EINTR);
	/* EAGAIN: nothing to drain (a stale readiness) */
}

static void unmute(struct evpoll_uring *u)
{
	if (!u->muted) {
		return;
	}
	u->muted = false;
	io_uring_cq_eventfd_toggle(u->ring, true);
}

/*
 * Mute the eventfd while the loop spins and no delivery is in progress (a
 * nested loop inside a handler must hear it). A plain store to the shared
 * CQ flags: a kernel that still reads the old value signals the eventfd
 * once more, which is harmless (the fd handler drains it while spinning).
 */
static void mute(struct evpoll_uring *u)
{
	if (!u->can_mute || u->muted || !u->entered || u->detaching ||
	    u->frames != NULL) {
		return;
	}
	if (io_uring_cq_eventfd_toggle(u->ring, false) == 0) {
		u->muted = true;
	} else {
		u->can_mute = false;
	}
}

/* Hold one pin exactly while the option is on and requests are in flight. */
static void update_pin(struct evpoll_uring *u)
{
	bool want = u->pin_inflight && u->inflight > 0 && !u->detaching &&
		    u->ev != NULL;

	if (want == u->pinned) {
		return;
	}
	u->pinned = want;
	if (want) {
		evpoll_pin(u->ev);
	} else if (u->ev != NULL) {
		evpoll_unpin(u->ev);
	}
}

static void account(struct evpoll_uring *u, const struct io_uring_cqe *cqe,
		    enum reap_path path)
{
	u->stats.cqes++;
	switch (path) {
	case PATH_POLL:
		u->stats.cqes_polled++;
		break;
	case PATH_EVENTFD:
		u->stats.cqes_eventfd++;
		break;
	case PATH_DRAIN:
		u->stats.cqes_drained++;
		break;
	}
	if ((cqe->flags & IORING_CQE_F_MORE) == 0 && u->inflight > 0) {
		u->inflight--;
		if (u->inflight == 0) {
			update_pin(u);
		}
	}
}

/* ---- reaping ------------------------------------------------------------- */

/* A CQE, or a 32-byte CQE of an IORING_SETUP_CQE32 ring. */
union cqe_copy {
	struct io_uring_cqe cqe;
	unsigned char bytes[2 * sizeof(struct io_uring_cqe)];
};

static void nested_handler(struct tevent_context *ev,
			   struct tevent_immediate *im, void *private_data);

static void nest_arm(struct evpoll_uring *u)
{
	if (u->ev != NULL) {
		tevent_schedule_immediate(u->nest_im, u->ev, nested_handler,
					  u);
	}
}

static void nest_disarm(struct evpoll_uring *u)
{
	if (u->ev != NULL) {
		/* a NULL handler cancels */
		tevent_schedule_immediate(u->nest_im, u->ev, NULL, NULL);
	}
}

/*
 * Deliver up to budget CQEs (see the top of the file). enter: when the
 * queue looks empty, run the ring's deferred task work
 * (io_uring_get_events()) and look again, as long as that yields CQEs:
 * since Linux 6.13 one call runs at most about 20 items of it. Returns the
 * number delivered; *gone is set when a handler freed the adapter, which
 * must then not be touched.
 */
static unsigned deliver(struct evpoll_uring *u, unsigned budget, bool enter,
			enum reap_path path, bool *gone)
{
	struct io_uring *ring = u->ring;
	struct io_uring_cqe *batch[REAP_BATCH];
	struct uring_frame frame = { .prev = u->frames };
	size_t size = sizeof(struct io_uring_cqe);
	bool outermost = u->frames == NULL;
	bool armed = false;
	unsigned done = 0;

	if ((ring->flags & IORING_SETUP_CQE32) != 0) {
		size *= 2;
	}
	*gone = false;
	u->frames = &frame;
	while (done < budget) {
		unsigned want = budget - done;
		unsigned n, i;

		if (want > REAP_BATCH) {
			want = REAP_BATCH;
		}
		n = io_uring_peek_batch_cqe(ring, batch, want);
		if (n == 0 && enter) {
			io_uring_get_events(ring);
			n = io_uring_peek_batch_cqe(ring, batch, want);
			enter = n > 0;
		}
		if (n == 0) {
			break;
		}
		for (i = 0; i < n; i++) {
			union cqe_copy c;
			unsigned head;

			memcpy(&c, batch[i], size);
			/* seen before the handler runs: exactly once */
			io_uring_cq_advance(ring, 1);
			head = *ring->cq.khead;
			account(u, &c.cqe, path);
			done++;
			if (outermost && !armed) {
				nest_arm(u);
				armed = true;
			}
			u->handler(u->ev, &c.cqe, u->private_data);
			if (frame.freed) {
				/* the rest of the batch stays in the ring */
				*gone = true;
				return done;
			}
			if (*ring->cq.khead != head) {
				/* a nested reap moved on: batch is stale */
				break;
			}
		}
	}
	u->frames = frame.prev;
	if (armed) {
		nest_disarm(u);
		/* a nested loop may have un-muted the eventfd */
		mute(u);
	}
	return done;
}

/* Runs only in a loop nested inside a handler: see "Nested loops". */
static void nested_handler(struct tevent_context *ev,
			   struct tevent_immediate *im, void *private_data)
{
	struct evpoll_uring *u = private_data;
	unsigned n;
	bool gone;

	n = deliver(u, REAP_BUDGET, u->defer_taskrun, PATH_EVENTFD, &gone);
	if (gone) {
		return;
	}
	if (u->muted) {
		/* from now on the nested loop hears the eventfd */
		unmute(u);
		full_barrier();
		n += deliver(u, REAP_BUDGET, u->defer_taskrun, PATH_EVENTFD,
			     &gone);
		if (gone) {
			return;
		}
	}
	if (n >= REAP_BUDGET) {
		self_signal(u);
	}
}

/*
 * The eventfd path. Drain the eventfd first, then reap: a CQE posted after
 * the drain signals the eventfd again (if it is enabled, and it is whenever
 * the loop may sleep), a CQE posted before it is in the queue the reap
 * reads. Either way it is delivered. With IORING_SETUP_DEFER_TASKRUN the
 * kernel signals only when its task work list becomes non-empty, so the
 * reap runs that work (io_uring_get_events()), which empties the list and
 * re-arms the signal.
 */
static void fd_handler(struct tevent_context *ev, struct tevent_fd *fde,
		       uint16_t flags, void *private_data)
{
	struct evpoll_uring *u = private_data;
	unsigned n;
	bool gone;

	drain_eventfd(u);
	u->stats.eventfd_wakeups++;
	n = deliver(u, REAP_BUDGET, u->defer_taskrun, PATH_EVENTFD, &gone);
	if (gone) {
		return;
	}
	if (n >= REAP_BUDGET && !u->muted) {
		/*
		 * More may be waiting: come back after the other events.
		 * (While muted the loop spins and its poll reaps the rest.)
		 */
		self_signal(u);
	}
}

/* ---- the poll path (evpoll loops only) ----------------------------------- */

static void poll_enter(struct tevent_context *ev, void *private_data)
{
	struct evpoll_uring *u = private_data;

	u->entered = true;
	mute(u);
}

static int poll_fn(struct tevent_context *ev, void *private_data)
{
	struct evpoll_uring *u = private_data;
	bool enter = u->defer_taskrun && !u->taskrun_flag;
	unsigned n;
	bool gone;

	/*
	 * With IORING_SETUP_TASKRUN_FLAG io_uring_peek_batch_cqe() sees
	 * IORING_SQ_TASKRUN and runs the task work itself; without it only
	 * entering the kernel finds out.
	 */
	n = deliver(u, REAP_BUDGET, enter, PATH_POLL, &gone);
	return (int)n;
}

/*
 * The loop stops spinning and may sleep: re-enable the eventfd, then
 * drain. Why no CQE is lost: the kernel decides whether to signal the
 * eventfd after it has published a CQE (tail store, then flag load). A CQE
 * whose flag load sees the re-enable is signalled and the sleeping loop
 * wakes for it; a CQE whose flag load saw "disabled" was published before
 * that load, and full_barrier() guarantees its tail store is visible to the
 * drain below (see there), which delivers it. A CQE found here was also not
 * delivered before: the poll callback consumed everything before it.
 * Deferred task work (IORING_SETUP_DEFER_TASKRUN) is run by the drain for
 * the same reason: its list may have become non-empty while muted, and the
 * kernel signals only on that transition.
 */
static void poll_exit(struct tevent_context *ev, void *private_data)
{
	struct evpoll_uring *u = private_data;
	unsigned n;
	bool gone;

	u->entered = false;
	if (!u->muted) {
		/* not muted: the eventfd saw every CQE */
		return;
	}
	unmute(u);
	if (u->detaching) {
		/* the eventfd goes away: nothing to drain for */
		return;
	}
	full_barrier();
	n = deliver(u, REAP_BUDGET, u->defer_taskrun, PATH_DRAIN, &gone);
	if (gone) {
		return;
	}
	if (n > 0) {
		/* completions are flowing: spin again at the next iteration */
		evpoll_activity(ev);
	}
	if (n >= REAP_BUDGET) {
		self_signal(u);
	}
}

/* ---- life cycle ---------------------------------------------------------- */

static int watch_destructor(struct uring_watch *w)
{
	struct evpoll_uring *u = w->u;

	if (u != NULL) {
		/* the context, its pins and its polls are going away */
		u->ev = NULL;
		u->watch = NULL;
		u->pinned = false;
		u->entered = false;
	}
	return 0;
}

static int uring_destructor(struct evpoll_uring *u)
{
	frames_freed(u->frames);
	u->detaching = true;
	/* runs poll_exit while spinning: it only unmutes */
	TALLOC_FREE(u->poll);
	TALLOC_FREE(u->fde);
	/* still muted if the context went away while spinning */
	unmute(u);
	if (u->registered) {
		io_uring_unregister_eventfd(u->ring);
	}
	if (u->efd != -1) {
		close(u->efd);
	}
	update_pin(u);
	if (u->watch != NULL) {
		u->watch->u = NULL;
		TALLOC_FREE(u->watch);
	}
	return 0;
}

static struct evpoll_uring *attach_fail(struct evpoll_uring *u, int err)
{
	talloc_free(u);
	errno = err;
	return NULL;
}

_PUBLIC_ struct evpoll_uring *evpoll_uring_attach(struct tevent_context *ev,
						  TALLOC_CTX *mem_ctx,
						  struct io_uring *ring,
						  evpoll_cqe_fn handler,
						  void *private_data)
{
	struct evpoll_uring *u;
	int ret;

	if (ev == NULL || ring == NULL || handler == NULL ||
	    ring->ring_fd < 0 || ring->cq.khead == NULL ||
	    (ring->flags & IORING_SETUP_IOPOLL) != 0) {
		errno = EINVAL;
		return NULL;
	}
	asym_init();

	u = talloc_zero(mem_ctx, struct evpoll_uring);
	if (u == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	u->ev = ev;
	u->ring = ring;
	u->handler = handler;
	u->private_data = private_data;
	u->efd = -1;
	u->defer_taskrun = (ring->flags & IORING_SETUP_DEFER_TASKRUN) != 0;
	u->taskrun_flag = (ring->flags & IORING_SETUP_TASKRUN_FLAG) != 0;
	talloc_set_destructor(u, uring_destructor);

	u->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (u->efd == -1) {
		return attach_fail(u, errno);
	}
	ret = io_uring_register_eventfd(ring, u->efd);
	if (ret < 0) {
		/* EBUSY: the ring has an eventfd (another adapter's?) */
		return attach_fail(u, -ret);
	}
	u->registered = true;
	/* kernels before 5.8 have no CQ flags: then the eventfd stays on */
	u->can_mute = ring->cq.kflags != NULL;
	if (u->can_mute) {
		/*
		 * A stale mute would leave a sleeping loop deaf; CQEs posted
		 * while it was set are caught by the signal at the end.
		 */
		io_uring_cq_eventfd_toggle(ring, true);
	}

	u->watch = talloc_zero(ev, struct uring_watch);
	if (u->watch == NULL) {
		return attach_fail(u, ENOMEM);
	}
	u->watch->u = u;
	talloc_set_destructor(u->watch, watch_destructor);

	u->nest_im = tevent_create_immediate(u);
	if (u->nest_im == NULL) {
		return attach_fail(u, ENOMEM);
	}

	u->fde = tevent_add_fd(ev, u, u->efd, TEVENT_FD_READ, fd_handler, u);
	if (u->fde == NULL) {
		return attach_fail(u, ENOMEM);
	}
	if (evpoll_is_evpoll(ev)) {
		/* on a spinning loop poll_enter runs at once */
		u->poll = evpoll_add_poll(ev, u, poll_enter, poll_exit,
					  poll_fn, u);
		if (u->poll == NULL) {
			return attach_fail(u, ENOMEM);
		}
	}
	/*
	 * The kernel signals the eventfd only for CQEs posted after the
	 * registration above; CQEs (and task work) from before it would wait
	 * for the next one. Signal once ourselves: the next iteration reaps.
	 */
	self_signal(u);
	return u;
}

_PUBLIC_ int evpoll_uring_submit(struct evpoll_uring *u)
{
	int ret;

	if (u == NULL) {
		return -EINVAL;
	}
	ret = io_uring_submit(u->ring);
	if (ret > 0) {
		/*
		 * Inline completions (NOPs, cached reads) are already in the
		 * queue, but they are delivered only by the loop, after this
		 * count: it cannot go below the CQEs it covers.
		 */
		u->stats.submitted += (uint64_t)ret;
		u->inflight += (uint64_t)ret;
		update_pin(u);
	}
	return ret;
}

_PUBLIC_ int evpoll_uring_add_inflight(struct evpoll_uring *u, int delta)
{
	if (u == NULL) {
		return EINVAL;
	}
	if (delta >= 0) {
		u->inflight += (uint64_t)delta;
	} else if ((uint64_t)-(int64_t)delta >= u->inflight) {
		u->inflight = 0;
	} else {
		u->inflight -= (uint64_t)-(int64_t)delta;
	}
	update_pin(u);
	return 0;
}

_PUBLIC_ int evpoll_uring_set_pin_inflight(struct evpoll_uring *u, bool pin)
{
	if (u == NULL) {
		return EINVAL;
	}
	u->pin_inflight = pin;
	update_pin(u);
	return 0;
}

_PUBLIC_ int evpoll_uring_get_stats(struct evpoll_uring *u,
				    struct evpoll_uring_stats *st)
{
	if (u == NULL || st == NULL) {
		return EINVAL;
	}
	*st = u->stats;
	st->inflight = u->inflight;
	return 0;
}
