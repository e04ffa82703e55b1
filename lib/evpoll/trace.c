/*
 * What the user's trace callbacks see of evpoll: the same as of the epoll
 * backend.
 *
 * 1. evpoll's own spin fd never reaches an fd trace callback: it is added
 *    and freed with the fd trace callback muted, and while a wait is open
 *    the filter below drops it.
 * 2. One BEFORE_WAIT ... AFTER_WAIT pair brackets one spinning wait. evpoll_wait_begin() emits BEFORE_WAIT when a loop_once
 *    finds nothing to run and starts to spin; evpoll_wait_end() emits
 *    AFTER_WAIT when the wait ends. While the wait is open the user's
 *    callbacks are replaced by filters that drop the trace points of the
 *    epoll backend's own waits (the zero-timeout checks of the spin, and
 *    the sleep after it) and end the wait before the first handler runs:
 *    the BEFORE_HANDLER trace of any event ends it, so the user's handlers
 *    always run with the user's own callbacks in place. When the spin
 *    times out, the wait ends and the next loop_once sleeps in the epoll
 *    backend, whose own BEFORE_WAIT/AFTER_WAIT pair the user sees.
 *
 * Filters are installed only when the user has a loop or fd trace callback
 * (with none there is nothing to hide). If a callback is replaced while a
 * wait is open (by a poll callback), the new one is kept.
 */
#include "evpoll_internal.h"

static void point_filter(enum tevent_trace_point tp, void *private_data)
{
	struct evpoll_state *st = private_data;

	if (tp == TEVENT_TRACE_BEFORE_WAIT || tp == TEVENT_TRACE_AFTER_WAIT) {
		return;
	}
	if (st->trace.point != NULL) {
		st->trace.point(tp, st->trace.point_pd);
	}
}

static void fd_filter(struct tevent_fd *fde, enum tevent_event_trace_point tp,
		      void *private_data)
{
	struct evpoll_state *st = private_data;

	if (fde == st->spin_fde) {
		return;
	}
	if (tp == TEVENT_EVENT_TRACE_BEFORE_HANDLER) {
		evpoll_wait_end(st);
		tevent_trace_fd_callback(st->ev, fde, tp);
		return;
	}
	if (st->trace.fd != NULL) {
		st->trace.fd(fde, tp, st->trace.fd_pd);
	}
}

static void timer_filter(struct tevent_timer *te,
			 enum tevent_event_trace_point tp, void *private_data)
{
	struct evpoll_state *st = private_data;

	if (tp == TEVENT_EVENT_TRACE_BEFORE_HANDLER) {
		evpoll_wait_end(st);
		tevent_trace_timer_callback(st->ev, te, tp);
		return;
	}
	if (st->trace.timer != NULL) {
		st->trace.timer(te, tp, st->trace.timer_pd);
	}
}

static void signal_filter(struct tevent_signal *se,
			  enum tevent_event_trace_point tp, void *private_data)
{
	struct evpoll_state *st = private_data;

	if (tp == TEVENT_EVENT_TRACE_BEFORE_HANDLER) {
		evpoll_wait_end(st);
		tevent_trace_signal_callback(st->ev, se, tp);
		return;
	}
	if (st->trace.sig != NULL) {
		st->trace.sig(se, tp, st->trace.sig_pd);
	}
}

static void immediate_filter(struct tevent_immediate *im,
			     enum tevent_event_trace_point tp,
			     void *private_data)
{
	struct evpoll_state *st = private_data;

	if (tp == TEVENT_EVENT_TRACE_BEFORE_HANDLER) {
		evpoll_wait_end(st);
		tevent_trace_immediate_callback(st->ev, im, tp);
		return;
	}
	if (st->trace.im != NULL) {
		st->trace.im(im, tp, st->trace.im_pd);
	}
}

void evpoll_wait_begin(struct evpoll_state *st)
{
	struct evpoll_trace *t = &st->trace;
	struct tevent_context *ev = st->ev;

	if (t->open) {
		return;
	}
	tevent_trace_point_callback(ev, TEVENT_TRACE_BEFORE_WAIT);
	t->open = true;
	tevent_get_trace_callback(ev, &t->point, &t->point_pd);
	tevent_get_trace_fd_callback(ev, &t->fd, &t->fd_pd);
	t->hooked = t->point != NULL || t->fd != NULL;
	if (!t->hooked) {
		return;
	}
	tevent_get_trace_timer_callback(ev, &t->timer, &t->timer_pd);
	tevent_get_trace_signal_callback(ev, &t->sig, &t->sig_pd);
	tevent_get_trace_immediate_callback(ev, &t->im, &t->im_pd);
	tevent_set_trace_callback(ev, point_filter, st);
	tevent_set_trace_fd_callback(ev, fd_filter, st);
	tevent_set_trace_timer_callback(ev, timer_filter, st);
	tevent_set_trace_signal_callback(ev, signal_filter, st);
	tevent_set_trace_immediate_callback(ev, immediate_filter, st);
}

/* Put each user callback back, unless someone replaced our filter. */
static void unhook(struct evpoll_state *st)
{
	struct evpoll_trace *t = &st->trace;
	struct tevent_context *ev = st->ev;
	tevent_trace_callback_t pcb;
	tevent_trace_fd_callback_t fcb;
	tevent_trace_timer_callback_t tcb;
	tevent_trace_signal_callback_t scb;
	tevent_trace_immediate_callback_t icb;
	void *pd;

	tevent_get_trace_callback(ev, &pcb, &pd);
	if (pcb == point_filter && pd == st) {
		tevent_set_trace_callback(ev, t->point, t->point_pd);
	}
	tevent_get_trace_fd_callback(ev, &fcb, &pd);
	if (fcb == fd_filter && pd == st) {
		tevent_set_trace_fd_callback(ev, t->fd, t->fd_pd);
	}
	tevent_get_trace_timer_callback(ev, &tcb, &pd);
	if (tcb == timer_filter && pd == st) {
		tevent_set_trace_timer_callback(ev, t->timer, t->timer_pd);
	}
	tevent_get_trace_signal_callback(ev, &scb, &pd);
	if (scb == signal_filter && pd == st) {
		tevent_set_trace_signal_callback(ev, t->sig, t->sig_pd);
	}
	tevent_get_trace_immediate_callback(ev, &icb, &pd);
	if (icb == immediate_filter && pd == st) {
		tevent_set_trace_immediate_callback(ev, t->im, t->im_pd);
	}
}

void evpoll_wait_end(struct evpoll_state *st)
{
	struct evpoll_trace *t = &st->trace;

	if (!t->open) {
		return;
	}
	t->open = false;
	if (t->hooked) {
		t->hooked = false;
		unhook(st);
	}
	tevent_trace_point_callback(st->ev, TEVENT_TRACE_AFTER_WAIT);
}

/* Close the wait without a trace point (a fork child's inherited wait). */
void evpoll_wait_abandon(struct evpoll_state *st)
{
	struct evpoll_trace *t = &st->trace;

	t->open = false;
	if (t->hooked) {
		t->hooked = false;
		unhook(st);
	}
}

void evpoll_trace_mute_fd(struct evpoll_state *st, struct evpoll_fd_mute *m)
{
	tevent_get_trace_fd_callback(st->ev, &m->cb, &m->pd);
	if (m->cb != NULL) {
		tevent_set_trace_fd_callback(st->ev, NULL, NULL);
	}
}

void evpoll_trace_unmute_fd(struct evpoll_state *st, struct evpoll_fd_mute *m)
{
	tevent_trace_fd_callback_t cb;
	void *pd;

	if (m->cb == NULL) {
		return;
	}
	tevent_get_trace_fd_callback(st->ev, &cb, &pd);
	if (cb == NULL) {
		tevent_set_trace_fd_callback(st->ev, m->cb, m->pd);
	}
}
