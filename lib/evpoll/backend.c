/*
 * The "evpoll" tevent backend: the epoll backend's ops with our own
 * context_init, loop_once and loop_wait.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "evlist.h"
#include "evpoll_internal.h"

const struct tevent_ops *evpoll_epoll_ops;
static struct tevent_ops evpoll_ops;
/*
 * evpoll_init() runs its setup under this lock until it succeeds once, so
 * a first attempt that failed (no memory) is retried by the next call.
 */
static pthread_mutex_t evpoll_init_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool evpoll_registered;	/* release store, acquire load */

static int sigtrack_destructor(struct evpoll_sigtrack *t)
{
	if (t->st != NULL) {
		EVLIST_REMOVE(t->st->sigtracks, t->st->sigtracks_tail, t);
		t->st->nsignals--;
	}
	return 0;
}

void evpoll_sigtracks_detach(struct evpoll_state *st)
{
	struct evpoll_sigtrack *t;

	while ((t = st->sigtracks) != NULL) {
		EVLIST_REMOVE(st->sigtracks, st->sigtracks_tail, t);
		t->st = NULL;
	}
	st->nsignals = 0;
}

/*
 * Trampolines: a timer or signal handler of an evpoll context runs through
 * these, which count it exactly wherever tevent ends up running it (also
 * inside the epoll backend's wait). The small record is a talloc child of
 * the event, so it goes with it.
 */
struct evpoll_tramp {
	struct evpoll_state *st;
	union {
		tevent_timer_handler_t timer;
		tevent_signal_handler_t signal;
	} fn;
	void *private_data;
};

static void timer_tramp(struct tevent_context *ev, struct tevent_timer *te,
			struct timeval now, void *private_data)
{
	struct evpoll_tramp *t = private_data;
	/* the handler may free te, and t with it */
	tevent_timer_handler_t fn = t->fn.timer;
	void *p = t->private_data;

	t->st->stats.timer_dispatches++;
	t->st->other_fired = true;
	fn(ev, te, now, p);
}

static struct tevent_timer *evpoll_add_timer_op(
	struct tevent_context *ev, TALLOC_CTX *mem_ctx,
	struct timeval next_event, tevent_timer_handler_t handler,
	void *private_data, const char *handler_name, const char *location)
{
	struct evpoll_state *st = evpoll_state_get(ev);
	struct evpoll_tramp *t;
	struct tevent_timer *te;

	if (st == NULL) {
		return evpoll_epoll_ops->add_timer(ev, mem_ctx, next_event,
						   handler, private_data,
						   handler_name, location);
	}
	t = talloc(NULL, struct evpoll_tramp);
	if (t == NULL) {
		return NULL;
	}
	t->st = st;
	t->fn.timer = handler;
	t->private_data = private_data;
	te = evpoll_epoll_ops->add_timer(ev, mem_ctx, next_event, timer_tramp,
					 t, handler_name, location);
	if (te == NULL) {
		talloc_free(t);
		return NULL;
	}
	talloc_steal(te, t);
	return te;
}

static void signal_tramp(struct tevent_context *ev, struct tevent_signal *se,
			 int signum, int count, void *siginfo,
			 void *private_data)
{
	struct evpoll_tramp *t = private_data;
	tevent_signal_handler_t fn = t->fn.signal;
	void *p = t->private_data;

	t->st->stats.signal_dispatches++;
	t->st->other_fired = true;
	fn(ev, se, signum, count, siginfo, p);
}

static struct tevent_signal *evpoll_add_signal_op(
	struct tevent_context *ev, TALLOC_CTX *mem_ctx, int signum,
	int sa_flags, tevent_signal_handler_t handler, void *private_data,
	const char *handler_name, const char *location)
{
	struct evpoll_state *st = evpoll_state_get(ev);
	struct tevent_signal *se;
	struct evpoll_sigtrack *track;
	struct evpoll_tramp *t;

	if (st == NULL) {
		return evpoll_epoll_ops->add_signal(ev, mem_ctx, signum,
						    sa_flags, handler,
						    private_data, handler_name,
						    location);
	}
	t = talloc(NULL, struct evpoll_tramp);
	if (t == NULL) {
		return NULL;
	}
	t->st = st;
	t->fn.signal = handler;
	t->private_data = private_data;
	se = evpoll_epoll_ops->add_signal(ev, mem_ctx, signum, sa_flags,
					  signal_tramp, t, handler_name,
					  location);
	if (se == NULL) {
		talloc_free(t);
		return NULL;
	}
	talloc_steal(se, t);
	track = talloc_zero(se, struct evpoll_sigtrack);
	if (track == NULL) {
		talloc_free(se);
		return NULL;
	}
	track->st = st;
	EVLIST_APPEND(st->sigtracks, st->sigtracks_tail, track);
	st->nsignals++;
	talloc_set_destructor(track, sigtrack_destructor);
	return se;
}

/*
 * Runs instead of tevent's destructor of the context, then calls it: the
 * spin ends (exit callbacks) and the state goes inert BEFORE any child of
 * the context is freed, so every poll is treated alike whatever its talloc
 * parent.
 */
static int context_destructor(struct tevent_context *ev)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st != NULL) {
		/*
		 * Every enter gets its exit, also when the context goes while
		 * spinning; a fork child freeing what it inherited runs none.
		 */
		if (!evpoll_inherited(st)) {
			evpoll_wait_abandon(st);
			evpoll_spin_exit(st, evpoll_now_ns());
		}
		evpoll_state_inert(st);
	}
	return tevent_common_context_destructor(ev);
}

/* The context is going away: nothing calls back into the user. */
void evpoll_state_inert(struct evpoll_state *st)
{
	evpoll_registry_remove(st);
	evpoll_sigtracks_detach(st);
	/* polls become inert (their exits ran when the spin ended) */
	evpoll_polls_detach(st);
	evpoll_spin_drop(st);
}

static int state_destructor(struct evpoll_state *st)
{
	evpoll_state_inert(st);
	evpoll_waker_unref(st->waker);
	TALLOC_FREE(st->spin_fde);
	if (st->spin_fd != -1) {
		close(st->spin_fd);
	}
	return 0;
}

static int evpoll_context_init_op(struct tevent_context *ev)
{
	struct evpoll_state *st;
	int ret;

	ret = evpoll_epoll_ops->context_init(ev);
	if (ret != 0) {
		return ret;
	}

	st = evpoll_state_get(ev);
	if (st != NULL) {
		/*
		 * tevent_re_initialise(): tevent detached every fd (our spin
		 * fd's too) and every signal event; start again from "not
		 * spinning" and "no signal events". In a fork child (smbd's
		 * reinit_after_fork) the spin was the parent's: no callbacks.
		 */
		if (!evpoll_inherited(st)) {
			evpoll_wait_abandon(st);
			evpoll_spin_exit(st, evpoll_now_ns());
		}
		evpoll_sigtracks_detach(st);
		talloc_set_destructor(ev, context_destructor);
		return 0;
	}

	st = talloc_zero(ev, struct evpoll_state);
	if (st == NULL) {
		return -1;
	}
	st->ev = ev;
	st->spin_fd = -1;
	st->pid = tevent_cached_getpid();
	/*
	 * Nobody can have set a debug hook on a context that is being
	 * created: bad environment values are reported at the first
	 * iteration instead.
	 */
	evpoll_config_load(&st->cfg, st, &st->env_report);
	st->waker = evpoll_waker_new();
	if (st->waker == NULL) {
		talloc_free(st);
		return -1;
	}
	/* counter 1, never read: always readable */
	st->spin_fd = eventfd(1, EFD_CLOEXEC | EFD_NONBLOCK);
	if (st->spin_fd == -1) {
		evpoll_waker_unref(st->waker);
		talloc_free(st);
		return -1;
	}
	evpoll_registry_add(st);
	talloc_set_destructor(st, state_destructor);
	talloc_set_destructor(ev, context_destructor);
	return 0;
}

/* One debug message per bad EVPOLL_* value seen at creation. */
static void report_env(struct evpoll_state *st)
{
	char *line = st->env_report;

	while (line != NULL && *line != '\0') {
		char *end = strchr(line, '\n');

		if (end != NULL) {
			*end = '\0';
		}
		tevent_debug(st->ev, TEVENT_DEBUG_ERROR, "%s\n", line);
		line = end != NULL ? end + 1 : NULL;
	}
	TALLOC_FREE(st->env_report);
}

static int evpoll_loop_once_op(struct tevent_context *ev, const char *location)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st == NULL) {
		return evpoll_epoll_ops->loop_once(ev, location);
	}
	st->stats.iterations++;
	evpoll_inherited(st);
	if (st->trace.open) {
		/* a nested loop inside a poll callback: the outer wait ends */
		evpoll_wait_end(st);
	}
	if (st->env_report != NULL) {
		report_env(st);
	}
	if (!st->spinning && evpoll_wants_spin(st)) {
		evpoll_spin_enter(st, evpoll_now_ns());
	}
	if (st->spinning) {
		return evpoll_spin_once(st, location);
	}
	return evpoll_sleep_once(st, location);
}

/*
 * Like tevent's loop_wait: run until no events remain. Our spin fd is an
 * event too; while it is the only one we must not loop forever, so when
 * the loop has been idle for spin_ns (only ALWAYS mode or a pin keep it
 * spinning that long) the spin stops for one check of the remaining events.
 */
static int evpoll_loop_wait_op(struct tevent_context *ev, const char *location)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	for (;;) {
		int ret;

		if (st != NULL && st->spinning) {
			uint64_t now = evpoll_now_ns();

			if (now - st->last_activity_ns >= st->cfg.spin_ns &&
			    st->polls == NULL) {
				evpoll_spin_exit(st, now);
			}
		}
		if ((st == NULL || !st->spinning) &&
		    !tevent_common_have_events(ev)) {
			return 0;
		}
		ret = tevent_loop_once(ev);
		if (ret != 0) {
			tevent_debug(ev, TEVENT_DEBUG_FATAL,
				     "evpoll: loop_once failed: %d (%s)\n",
				     ret, strerror(errno));
			return ret;
		}
	}
}

static void evpoll_do_init(void)
{
	const struct tevent_ops *ops;

	/* also runs tevent's own one-time backend setup, under our lock */
	evpoll_epoll_ops = tevent_find_ops_byname("epoll");
	if (evpoll_epoll_ops == NULL) {
		return;
	}
	evpoll_ops = *evpoll_epoll_ops;
	evpoll_ops.context_init = evpoll_context_init_op;
	evpoll_ops.loop_once = evpoll_loop_once_op;
	evpoll_ops.loop_wait = evpoll_loop_wait_op;
	evpoll_ops.add_signal = evpoll_add_signal_op;
	evpoll_ops.add_timer = evpoll_add_timer_op;
	tevent_register_backend("evpoll", &evpoll_ops);
	ops = tevent_find_ops_byname("evpoll");
	if (ops == &evpoll_ops) {
		atomic_store_explicit(&evpoll_registered, true,
				      memory_order_release);
	}
}

_PUBLIC_ bool evpoll_init(void)
{
	/* acquire: pairs with the release store after a successful setup */
	if (atomic_load_explicit(&evpoll_registered, memory_order_acquire)) {
		return true;
	}
	pthread_mutex_lock(&evpoll_init_lock);
	if (!atomic_load_explicit(&evpoll_registered, memory_order_relaxed)) {
		evpoll_do_init();
	}
	pthread_mutex_unlock(&evpoll_init_lock);
	return atomic_load_explicit(&evpoll_registered, memory_order_acquire);
}

_PUBLIC_ struct tevent_context *evpoll_context_init(
	TALLOC_CTX *mem_ctx, const struct evpoll_config *cfg)
{
	struct tevent_context *ev;

	if (cfg != NULL && !evpoll_config_valid(cfg)) {
		errno = EINVAL;
		return NULL;
	}
	if (!evpoll_init()) {
		errno = ENOSYS;
		return NULL;
	}
	ev = tevent_context_init_byname(mem_ctx, "evpoll");
	if (ev == NULL) {
		if (errno == 0) {
			errno = ENOMEM;
		}
		return NULL;
	}
	if (cfg != NULL) {
		evpoll_set_config(ev, cfg);
	}
	return ev;
}

_PUBLIC_ bool evpoll_is_evpoll(struct tevent_context *ev)
{
	return evpoll_state_get(ev) != NULL;
}

_PUBLIC_ bool evpoll_is_spinning(struct tevent_context *ev)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	return st != NULL && st->spinning;
}

_PUBLIC_ void evpoll_pin(struct tevent_context *ev)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st == NULL) {
		return;
	}
	st->pins++;
}

_PUBLIC_ void evpoll_unpin(struct tevent_context *ev)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st == NULL) {
		return;
	}
	if (st->pins == 0) {
		tevent_debug(ev, TEVENT_DEBUG_ERROR,
			     "evpoll: evpoll_unpin() without evpoll_pin()\n");
		return;
	}
	st->pins--;
	if (st->pins == 0 && st->spinning) {
		/* the idle clock starts now, not at the last event */
		st->last_activity_ns = evpoll_now_ns();
	}
}

_PUBLIC_ void evpoll_activity(struct tevent_context *ev)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st == NULL) {
		return;
	}
	if (st->spinning) {
		st->last_activity_ns = evpoll_now_ns();
	} else {
		st->activity_pending = true;
	}
}

_PUBLIC_ int evpoll_get_stats(struct tevent_context *ev,
			      struct evpoll_stats *stats)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st == NULL || stats == NULL) {
		return EINVAL;
	}
	*stats = st->stats;
	if (st->spinning) {
		stats->spin_ns += evpoll_now_ns() - st->spin_start_ns;
	}
	return 0;
}
