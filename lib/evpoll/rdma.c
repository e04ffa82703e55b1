/*
 * RDMA completion queues on a tevent loop.
 *
 * Three ways into the same routine, service(), which polls the CQ:
 * - the completion channel's fd (a tevent_fd), when a CQ event arrives;
 * - an evpoll poll callback, on every pass while the loop spins;
 * - a tevent immediate: the first poll after the attach, the rest of a
 *   dispatch that hit its budget, and cover for nested loops (below).
 * The evpoll exit callback runs service() once more when a spin ends.
 *
 * The verbs rules this relies on: ibv_req_notify_cq() arms the CQ so that
 * the NEXT completion added to it raises one event on the channel, which
 * disarms it (entries already in the CQ raise none); ibv_get_cq_event()
 * reads one event; ibv_destroy_cq() waits until every event read was
 * acknowledged with ibv_ack_cq_events().
 *
 * r->armed means "we armed the CQ and have not read an event since": a
 * completion added from then on has raised, or will raise, an event that
 * makes the channel fd readable. It is cleared when an event is read.
 *
 * Why no completion is lost. The loop may sleep only after service() ran
 * with the loop not spinning (fd handler, immediate, exit callback; the
 * poll callback runs only while spinning, and the exit callback follows it
 * before any sleep). Such a service() ends in one of three ways:
 * 1. the budget ran out: the immediate is scheduled, the loop does not
 *    sleep before it runs service() again;
 * 2. the CQ was seen empty and r->armed was already set: every completion
 *    newer than that arm raises an event (or already did, and it waits
 *    unread in the fd), so the fd wakes the loop;
 * 3. the CQ was seen empty, then armed, then polled again (and drained if
 *    that poll found anything): a completion added before the arm took
 *    effect raised no event but is in the CQ and found by that poll; one
 *    added after it raises an event.
 * While spinning the CQ is left unarmed (an event that was already due is
 * read by the fd handler when the spin checks fds, and not re-armed): the
 * poll callback sees every completion within a pass.
 *
 * Why none is seen twice: completions are taken only from ibv_poll_cq(),
 * which returns each CQ entry once and advances the consumer index; events
 * carry no completion, they only make us poll, so an event for a
 * completion that was already polled (it landed after an arm but before
 * our poll after it) costs one empty poll and one re-arm, nothing more.
 * Each batch is handed to exactly one handler call.
 *
 * Nested loops: the handler may run one. evpoll skips a poll callback
 * inside a nested loop started from it, and the CQ may be unarmed while
 * the handler runs (spinning, or between reading an event and re-arming),
 * so before each handler call the immediate is scheduled if the CQ is not
 * covered by an arm; a nested loop then keeps polling through it. The
 * immediate is cancelled when the outermost handler call returns, so the
 * usual, non-nested case pays no extra loop iteration.
 *
 * Detaching: talloc_free() of the adapter, also from inside the handler
 * (every delivery in progress has a frame on r->frames; the destructor
 * marks them and a delivery checks its frame before touching r again).
 * The destructor acknowledges every event read but not yet acknowledged,
 * so the caller's ibv_destroy_cq() does not wait, and restores the
 * O_NONBLOCK flag of the channel fd if it set it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <string.h>

#include "evpoll_internal.h"
#include "evpoll_rdma.h"

/* at most this many events are read per fd dispatch */
#define EVENTS_PER_DISPATCH 64

struct rdma_frame {
	struct rdma_frame *prev;
	bool freed;
};

struct evpoll_rdma_cq {
	struct tevent_context *ev;
	struct ibv_cq *cq;
	struct ibv_comp_channel *channel;
	int fd;
	evpoll_wc_fn handler;
	void *private_data;

	struct tevent_fd *fde;
	struct tevent_immediate *im;
	struct evpoll_poll *poll;

	/* events read from the channel, not yet acknowledged */
	unsigned unacked;
	/* armed, and no event read since; see the top of the file */
	bool armed;
	/* between our poll's enter and exit callbacks */
	bool spinning;
	/* the destructor is running */
	bool detaching;
	/* we set O_NONBLOCK on the channel fd: clear it on detach */
	bool clear_nonblock;
	/* errors already reported (once each, a spinning loop would flood) */
	bool reported_poll_error;
	bool reported_notify_error;

	/* deliveries in progress, innermost first */
	struct rdma_frame *frames;
};

static void immediate_handler(struct tevent_context *ev,
			      struct tevent_immediate *im,
			      void *private_data);

static void schedule(struct evpoll_rdma_cq *r)
{
	tevent_schedule_immediate(r->im, r->ev, immediate_handler, r);
}

static void unschedule(struct evpoll_rdma_cq *r)
{
	/* a NULL handler cancels */
	tevent_schedule_immediate(r->im, r->ev, NULL, NULL);
}

static void ack_events(struct evpoll_rdma_cq *r)
{
	if (r->unacked > 0) {
		ibv_ack_cq_events(r->cq, r->unacked);
		r->unacked = 0;
	}
}

/* Request an event for the next completion. False on error (reported). */
static bool arm(struct evpoll_rdma_cq *r)
{
	int ret = ibv_req_notify_cq(r->cq, 0);

	if (ret != 0) {
		if (!r->reported_notify_error) {
			r->reported_notify_error = true;
			tevent_debug(r->ev, TEVENT_DEBUG_ERROR,
				     "evpoll_rdma: ibv_req_notify_cq failed: "
				     "%d; completions may be delayed\n", ret);
		}
		return false;
	}
	r->armed = true;
	return true;
}

/*
 * Hand one batch to the handler. Returns false if the handler freed the
 * adapter (then r must not be touched).
 */
static bool deliver(struct evpoll_rdma_cq *r, struct ibv_wc *wc, int n)
{
	struct rdma_frame frame = { .prev = r->frames, .freed = false };

	r->frames = &frame;
	if (r->spinning || !r->armed) {
		/* cover a nested loop the handler may run: see the top */
		schedule(r);
	}
	r->handler(r->ev, wc, n, r->private_data);
	if (frame.freed) {
		return false;
	}
	r->frames = frame.prev;
	if (r->frames == NULL) {
		unschedule(r);
	}
	return true;
}

enum drain_result {
	DRAIN_EMPTY,	/* the CQ was seen empty */
	DRAIN_BUDGET,	/* the budget ran out first */
	DRAIN_FREED,	/* the handler freed the adapter */
};

/* Poll and deliver until the CQ is seen empty or *budget is spent. */
static enum drain_result drain(struct evpoll_rdma_cq *r, unsigned *budget,
			       int *delivered)
{
	struct ibv_wc wc[EVPOLL_RDMA_WC_BATCH];

	while (*budget > 0) {
		int want = *budget < EVPOLL_RDMA_WC_BATCH ?
			   (int)*budget : EVPOLL_RDMA_WC_BATCH;
		int n = ibv_poll_cq(r->cq, want, wc);

		if (n < 0) {
			if (!r->reported_poll_error) {
				r->reported_poll_error = true;
				tevent_debug(r->ev, TEVENT_DEBUG_ERROR,
					     "evpoll_rdma: ibv_poll_cq "
					     "failed: %d\n", n);
			}
			/* nothing to take: as good as empty */
			return DRAIN_EMPTY;
		}
		if (n == 0) {
			return DRAIN_EMPTY;
		}
		*budget -= (unsigned)n;
		*delivered += n;
		if (!deliver(r, wc, n)) {
			return DRAIN_FREED;
		}
		if (n < want) {
			/*
			 * The CQ was empty when polled. A completion that
			 * came in since is found by the poll after the arm,
			 * or by the next poll callback while spinning.
			 */
			return DRAIN_EMPTY;
		}
	}
	return DRAIN_BUDGET;
}

/*
 * Deliver what the CQ holds, within the budget; unless spinning, leave the
 * CQ armed and seen empty after the arm (case 3 at the top), or the
 * immediate scheduled (case 1). Returns the number of completions
 * delivered; *freed tells whether the handler freed the adapter.
 */
static int service(struct evpoll_rdma_cq *r, bool *freed)
{
	unsigned budget = EVPOLL_RDMA_BUDGET;
	int delivered = 0;

	*freed = false;
	for (;;) {
		enum drain_result dr = drain(r, &budget, &delivered);

		if (dr == DRAIN_FREED) {
			*freed = true;
			return delivered;
		}
		if (dr == DRAIN_BUDGET) {
			if (!r->spinning) {
				/* case 1: the rest at the next iteration */
				schedule(r);
			}
			break;
		}
		/* seen empty */
		if (r->spinning || r->armed) {
			/* the poll callback, or case 2 */
			break;
		}
		if (!arm(r)) {
			break;
		}
		/* case 3: poll once more, after the arm */
	}
	if (r->frames != NULL && (r->spinning || !r->armed)) {
		/*
		 * We run in a nested loop inside an outer delivery: keep
		 * covering the outer handler, whose return cancels this.
		 */
		schedule(r);
	}
	return delivered;
}

/* Read the pending CQ events. True if one of them was ours. */
static bool read_events(struct evpoll_rdma_cq *r)
{
	bool ours = false;
	int i;

	for (i = 0; i < EVENTS_PER_DISPATCH; i++) {
		struct ibv_cq *ecq = NULL;
		void *ectx = NULL;

		errno = 0;
		if (ibv_get_cq_event(r->channel, &ecq, &ectx) != 0) {
			if (errno == EINTR) {
				continue;
			}
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				break;
			}
			/*
			 * End of file or a short read (errno 0), or a hard
			 * error: the fd would stay readable and spin the
			 * loop. Stop watching it.
			 */
			tevent_debug(r->ev, TEVENT_DEBUG_ERROR,
				     "evpoll_rdma: reading the completion "
				     "channel failed (%s); no longer "
				     "watching it\n",
				     errno != 0 ? strerror(errno) :
				     "short read");
			tevent_fd_set_flags(r->fde, 0);
			break;
		}
		if (ecq != r->cq) {
			/* the channel is meant to serve our CQ only */
			ibv_ack_cq_events(ecq, 1);
			tevent_debug(r->ev, TEVENT_DEBUG_ERROR,
				     "evpoll_rdma: dropped an event of "
				     "another CQ (%p) on the channel of CQ "
				     "%p\n", (void *)ecq, (void *)r->cq);
			continue;
		}
		ours = true;
		/* this event consumed our arm */
		r->armed = false;
		r->unacked++;
		if (r->unacked >= EVPOLL_RDMA_ACK_BATCH) {
			ack_events(r);
		}
	}
	return ours;
}

static void fd_handler(struct tevent_context *ev, struct tevent_fd *fde,
		       uint16_t flags, void *private_data)
{
	struct evpoll_rdma_cq *r = private_data;
	bool freed;

	read_events(r);
	/*
	 * Poll even when no event was ours: cheap, and harmless. While
	 * spinning this does not re-arm, the exit callback does.
	 */
	service(r, &freed);
}

static void immediate_handler(struct tevent_context *ev,
			      struct tevent_immediate *im,
			      void *private_data)
{
	struct evpoll_rdma_cq *r = private_data;
	bool freed;

	service(r, &freed);
}

static void poll_enter(struct tevent_context *ev, void *private_data)
{
	struct evpoll_rdma_cq *r = private_data;

	/*
	 * Verbs cannot disarm a CQ: an arm still pending fires once more,
	 * and the fd handler reads that event without re-arming.
	 */
	r->spinning = true;
}

static void poll_exit(struct tevent_context *ev, void *private_data)
{
	struct evpoll_rdma_cq *r = private_data;
	bool freed;
	int n;

	r->spinning = false;
	if (r->detaching) {
		return;
	}
	/* the loop may sleep next: arm, then poll after the arm */
	n = service(r, &freed);
	if (n > 0) {
		/* traffic again: spin on (ev, not r: r may be gone) */
		evpoll_activity(ev);
	}
}

static int poll_poll(struct tevent_context *ev, void *private_data)
{
	struct evpoll_rdma_cq *r = private_data;
	bool freed;

	return service(r, &freed);
}

static int rdma_destructor(struct evpoll_rdma_cq *r)
{
	struct rdma_frame *f;

	for (f = r->frames; f != NULL; f = f->prev) {
		f->freed = true;
	}
	r->frames = NULL;
	r->detaching = true;
	/* runs our exit callback if spinning; it returns at once */
	TALLOC_FREE(r->poll);
	TALLOC_FREE(r->fde);
	TALLOC_FREE(r->im);
	/* ibv_destroy_cq() waits for every event read to be acknowledged */
	ack_events(r);
	if (r->clear_nonblock) {
		int fl = fcntl(r->fd, F_GETFL);

		if (fl != -1) {
			fcntl(r->fd, F_SETFL, fl & ~O_NONBLOCK);
		}
	}
	return 0;
}

_PUBLIC_ struct evpoll_rdma_cq *evpoll_rdma_cq_attach(
	struct tevent_context *ev, TALLOC_CTX *mem_ctx, struct ibv_cq *cq,
	struct ibv_comp_channel *channel, evpoll_wc_fn handler,
	void *private_data)
{
	struct evpoll_rdma_cq *r;
	int fl;
	int ret;

	if (ev == NULL || cq == NULL || channel == NULL || handler == NULL ||
	    cq->channel != channel || cq->context == NULL) {
		errno = EINVAL;
		return NULL;
	}

	r = talloc_zero(mem_ctx, struct evpoll_rdma_cq);
	if (r == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	r->ev = ev;
	r->cq = cq;
	r->channel = channel;
	r->fd = channel->fd;
	r->handler = handler;
	r->private_data = private_data;

	fl = fcntl(r->fd, F_GETFL);
	if (fl == -1) {
		ret = errno;
		talloc_free(r);
		errno = ret;
		return NULL;
	}
	if ((fl & O_NONBLOCK) == 0) {
		if (fcntl(r->fd, F_SETFL, fl | O_NONBLOCK) == -1) {
			ret = errno;
			talloc_free(r);
			errno = ret;
			return NULL;
		}
		r->clear_nonblock = true;
	}
	talloc_set_destructor(r, rdma_destructor);

	r->im = tevent_create_immediate(r);
	if (r->im == NULL) {
		goto nomem;
	}
	r->fde = tevent_add_fd(ev, r, r->fd, TEVENT_FD_READ, fd_handler, r);
	if (r->fde == NULL) {
		goto nomem;
	}
	if (evpoll_is_evpoll(ev)) {
		/* runs poll_enter at once if the loop spins */
		r->poll = evpoll_add_poll(ev, r, poll_enter, poll_exit,
					  poll_poll, r);
		if (r->poll == NULL) {
			goto nomem;
		}
	}
	if (!r->spinning) {
		ret = ibv_req_notify_cq(cq, 0);
		if (ret != 0) {
			talloc_free(r);
			errno = ret > 0 ? ret : EIO;
			return NULL;
		}
		r->armed = true;
	}
	/* completions queued before the attach: at the next iteration */
	schedule(r);
	return r;

nomem:
	talloc_free(r);
	errno = ENOMEM;
	return NULL;
}
