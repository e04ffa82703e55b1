/*
 * Spin mode.
 *
 * While spinning, the loop keeps a tevent_fd on st->spin_fd, an eventfd
 * whose counter is never read and so always reads as ready. That turns a
 * call of the epoll backend's loop_once into a non-blocking check that
 * runs, as it always does, at most one of: pending signal handlers, a
 * cross-thread immediate, an immediate, a due timer (including timers moved
 * with tevent_update_timer), one ready fd. epoll is level-triggered and
 * tevent asks for one event at a time, and the kernel moves a reported
 * level-triggered fd behind the other ready ones, so the spin fd and the
 * user's ready fds take turns: polls never starve fds and fds never starve
 * polls.
 *
 * One spinning loop_once call starts as the epoll backend's does: pending
 * signal handlers (for a context with signal events), cross-thread
 * immediates, one immediate (no syscall). If none ran, it runs poll passes
 * until a pass reports work, the spin times out, or a check of timers and
 * fds is due (poll_iterations passes or EVPOLL_CHECK_NS, whichever comes
 * first); the check runs a due timer or calls the epoll backend's
 * loop_once described above (one epoll_wait syscall, plus a gettimeofday
 * when timers exist). So handlers run in tevent's order.
 */
#include <errno.h>

#include "evpoll_internal.h"

static void spin_fd_handler(struct tevent_context *ev, struct tevent_fd *fde,
			    uint16_t flags, void *private_data)
{
	struct evpoll_state *st = private_data;

	st->spin_fde_fired = true;
}

bool evpoll_wants_spin(const struct evpoll_state *st)
{
	switch (st->cfg.mode) {
	case EVPOLL_MODE_NEVER:
		return false;
	case EVPOLL_MODE_ALWAYS:
		return true;
	case EVPOLL_MODE_AUTO:
		break;
	}
	return st->pins > 0 || st->activity_pending;
}

void evpoll_spin_enter(struct evpoll_state *st, uint64_t now)
{
	struct evpoll_fd_mute m;

	if (st->spinning || st->cfg.mode == EVPOLL_MODE_NEVER) {
		return;
	}
	/* our own fd: no ATTACH for the user's fd trace callback */
	evpoll_trace_mute_fd(st, &m);
	st->spin_fde = tevent_add_fd(st->ev, st, st->spin_fd, TEVENT_FD_READ,
				     spin_fd_handler, st);
	evpoll_trace_unmute_fd(st, &m);
	if (st->spin_fde == NULL) {
		tevent_debug(st->ev, TEVENT_DEBUG_ERROR,
			     "evpoll: cannot start spinning: no memory\n");
		return;
	}
	st->spinning = true;
	st->activity_pending = false;
	st->spin_start_ns = now;
	st->last_activity_ns = now;
	st->last_check_ns = now;
	st->passes_since_check = 0;
	st->now_ns = now;
	st->passes_since_clock = EVPOLL_CLOCK_EVERY;	/* read at once */
	st->stats.spin_entries++;
	/*
	 * relaxed: a producer that still reads true only makes a redundant
	 * kernel wake-up.
	 */
	atomic_store_explicit(&st->waker->may_sleep, false,
			      memory_order_relaxed);
	evpoll_polls_enter(st);
}

/* Our own fd: no DETACH for the user's fd trace callback. */
static void free_spin_fde(struct evpoll_state *st)
{
	struct evpoll_fd_mute m;

	if (st->spin_fde == NULL) {
		return;
	}
	evpoll_trace_mute_fd(st, &m);
	TALLOC_FREE(st->spin_fde);
	evpoll_trace_unmute_fd(st, &m);
}

void evpoll_spin_exit(struct evpoll_state *st, uint64_t now)
{
	if (!st->spinning) {
		return;
	}
	/*
	 * seq_cst store, then the exit callbacks' last checks for work: pairs
	 * with a producer's seq_cst publish of work followed by its seq_cst
	 * load in evpoll_waker_may_sleep(). Either the producer sees true and
	 * wakes the loop through the kernel, or an exit callback sees the
	 * work.
	 */
	atomic_store_explicit(&st->waker->may_sleep, true,
			      memory_order_seq_cst);
	st->spinning = false;
	free_spin_fde(st);
	st->stats.spin_exits++;
	st->stats.spin_ns += now - st->spin_start_ns;
	evpoll_polls_exit(st);
}

/*
 * A fork child found the parent's spin state: the polls' enter/exit state
 * belongs to the parent (its rings, its queues), so no callback may run
 * here. The inherited polls become inert; the child starts from "not
 * spinning". True if the state was inherited.
 */
bool evpoll_inherited(struct evpoll_state *st)
{
	pid_t me = tevent_cached_getpid();

	if (st->pid == me) {
		return false;
	}
	st->pid = me;
	evpoll_polls_detach(st);
	evpoll_spin_drop(st);
	return true;
}

/* Stop spinning without any callback. */
void evpoll_spin_drop(struct evpoll_state *st)
{
	if (st->spinning) {
		st->spinning = false;
		free_spin_fde(st);
	}
	evpoll_wait_abandon(st);
	/* seq_cst: as in evpoll_spin_exit */
	atomic_store_explicit(&st->waker->may_sleep, true,
			      memory_order_seq_cst);
}

static void note_activity(struct evpoll_state *st, uint64_t now)
{
	/* 'now' may be a cached reading older than evpoll_activity()'s */
	if (now > st->last_activity_ns) {
		st->last_activity_ns = now;
	}
}

/*
 * What the epoll backend's loop_once does before it waits, in the same
 * order: pending signal handlers (only for a context with signal events,
 * like tevent; the trampoline counts them), cross-thread immediates moved
 * onto the queue, then one immediate. True if a handler ran.
 */
static bool run_pending(struct evpoll_state *st)
{
	if (st->nsignals > 0 && tevent_common_check_signal(st->ev) != 0) {
		return true;
	}
	tevent_common_threaded_activate_immediate(st->ev);
	if (tevent_common_loop_immediate(st->ev)) {
		st->stats.immediate_dispatches++;
		return true;
	}
	return false;
}

/* Then a due timer (the trampoline counts it); true if one ran. */
static bool run_due_timer(struct evpoll_state *st)
{
	struct timeval tv = tevent_common_loop_timer_delay(st->ev);

	return tv.tv_sec == 0 && tv.tv_usec == 0;
}

/* Read the clock now; spin_now() counts from here. */
static uint64_t clock_fresh(struct evpoll_state *st)
{
	st->now_ns = evpoll_now_ns();
	st->passes_since_clock = 1;
	return st->now_ns;
}

/*
 * The check of everything, in the epoll backend's order; with the spin fd
 * registered its wait returns at once. *handled: a handler of the user's
 * ran (not only our spin fd's).
 */
static int spin_check(struct evpoll_state *st, const char *location,
		      bool *handled)
{
	int ret = 0;

	st->passes_since_check = 0;
	*handled = false;
	if (run_pending(st) || run_due_timer(st)) {
		*handled = true;
		st->last_check_ns = clock_fresh(st);
		note_activity(st, st->last_check_ns);
		return 0;
	}
	st->spin_fde_fired = false;
	st->other_fired = false;
	ret = evpoll_epoll_ops->loop_once(st->ev, location);
	st->last_check_ns = clock_fresh(st);
	if (!st->spin_fde_fired) {
		*handled = true;
		if (!st->other_fired) {
			st->stats.fd_dispatches++;
		}
		note_activity(st, st->last_check_ns);
	}
	return ret;
}

/* The clock while spinning, read every EVPOLL_CLOCK_EVERY calls. */
static uint64_t spin_now(struct evpoll_state *st)
{
	if (st->passes_since_clock >= EVPOLL_CLOCK_EVERY) {
		return clock_fresh(st);
	}
	st->passes_since_clock++;
	return st->now_ns;
}

/*
 * One loop_once while spinning: returns when a handler ran, a poll
 * reported work, the spin timed out (auto mode), or (in always
 * mode or pinned, where the spin has no end) after spin_ns with nothing
 * to do, like a wait that timed out.
 */
int evpoll_spin_once(struct evpoll_state *st, const char *location)
{
	uint64_t now, wait_start;

	if (run_pending(st)) {
		note_activity(st, spin_now(st));
		return 0;
	}

	evpoll_wait_begin(st);
	wait_start = spin_now(st);
	for (;;) {
		int work, ret;
		bool handled;

		now = spin_now(st);
		/*
		 * At least one pass between two checks, so that polls run
		 * even when the caller is slow between iterations.
		 */
		if (st->passes_since_check >= st->cfg.poll_iterations ||
		    (now - st->last_check_ns >= EVPOLL_CHECK_NS &&
		     st->passes_since_check > 0)) {
			ret = spin_check(st, location, &handled);
			if (ret != 0 || handled || !st->spinning) {
				evpoll_wait_end(st);
				return ret;
			}
			continue;
		}
		/*
		 * 'now' may be older than an evpoll_activity() call, which
		 * reads the clock itself: no timeout then.
		 */
		if (st->cfg.mode == EVPOLL_MODE_AUTO && st->pins == 0 &&
		    now > st->last_activity_ns &&
		    now - st->last_activity_ns >= st->cfg.spin_ns) {
			/*
			 * The spin timed out: the wait ends here and the next
			 * loop_once sleeps in the epoll backend (its own
			 * BEFORE_WAIT/AFTER_WAIT pair).
			 */
			evpoll_spin_exit(st, now);
			evpoll_wait_end(st);
			return 0;
		}
		if (now - wait_start >= st->cfg.spin_ns &&
		    now - st->last_activity_ns >= st->cfg.spin_ns) {
			evpoll_wait_end(st);
			return 0;
		}
		st->passes_since_check++;
		work = evpoll_run_polls(st);
		/*
		 * st->spinning: a callback may have reconfigured; trace.open:
		 * a nested loop in a callback ended our wait
		 */
		if (work > 0 || !st->spinning || !st->trace.open) {
			note_activity(st, now);
			evpoll_wait_end(st);
			return 0;
		}
	}
}

int evpoll_sleep_once(struct evpoll_state *st, const char *location)
{
	int ret = 0;

	if (!run_pending(st) && !run_due_timer(st)) {
		st->stats.sleeps++;
		st->other_fired = false;
		ret = evpoll_epoll_ops->loop_once(st->ev, location);
		if (!st->other_fired) {
			st->stats.fd_dispatches++;
		}
	}
	if (st->cfg.mode != EVPOLL_MODE_NEVER) {
		/* whatever woke the loop counts as activity */
		evpoll_spin_enter(st, evpoll_now_ns());
	}
	return ret;
}
