/*
 * evpoll internals: per-context state, the poll list, the waker.
 */
#ifndef EVPOLL_INTERNAL_H
#define EVPOLL_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "evpoll.h"
#include "visibility.h"

/*
 * libtevent exports these (versioned in its ABI files, checked by our
 * configure) but does not declare them in tevent.h.
 */
bool tevent_common_loop_immediate(struct tevent_context *ev);
int tevent_common_check_signal(struct tevent_context *ev);
void tevent_common_threaded_activate_immediate(struct tevent_context *ev);
struct timeval tevent_common_loop_timer_delay(struct tevent_context *ev);
bool tevent_common_have_events(struct tevent_context *ev);
int tevent_common_context_destructor(struct tevent_context *ev);
void tevent_debug(struct tevent_context *ev, enum tevent_debug_level level,
		  const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void tevent_trace_point_callback(struct tevent_context *ev,
				 enum tevent_trace_point tp);
void tevent_trace_fd_callback(struct tevent_context *ev,
			      struct tevent_fd *fde,
			      enum tevent_event_trace_point tp);
void tevent_trace_timer_callback(struct tevent_context *ev,
				 struct tevent_timer *te,
				 enum tevent_event_trace_point tp);
void tevent_trace_signal_callback(struct tevent_context *ev,
				  struct tevent_signal *se,
				  enum tevent_event_trace_point tp);
void tevent_trace_immediate_callback(struct tevent_context *ev,
				     struct tevent_immediate *im,
				     enum tevent_event_trace_point tp);

/* fds, timers and signals are checked at least this often while spinning */
#define EVPOLL_CHECK_NS 20000ULL
/*
 * While spinning the clock is read every this many passes (a read costs
 * about as much as a pass with nothing to do in a VM); the loop's entry
 * counts as a pass, so a check is late by at most that many passes.
 */
#define EVPOLL_CLOCK_EVERY 4

#define EVPOLL_DEFAULT_SPIN_NS 200000ULL
#define EVPOLL_DEFAULT_POLL_ITERATIONS 64U

struct evpoll_waker {
	/*
	 * Reference count. Increments are relaxed (the caller already holds a
	 * reference); the decrement is acq_rel so that the thread freeing
	 * the waker sees every other thread's last use of it.
	 */
	atomic_uint refs;
	/*
	 * True while the loop may sleep. The loop stores true with seq_cst
	 * before its exit callbacks make their last check for work; a
	 * producer loads it with seq_cst after publishing work with a seq_cst
	 * RMW. The two seq_cst pairs form a Dekker handshake: at least one
	 * side sees the other's store, so no wake-up is lost.
	 */
	atomic_bool may_sleep;
};

struct evpoll_poll {
	struct evpoll_poll *prev, *next;
	struct evpoll_state *st;	/* NULL once the context is gone */
	evpoll_enter_fn enter;
	evpoll_exit_fn exit;
	evpoll_poll_fn poll;
	void *private_data;
	bool entered;	/* enter ran, exit not yet */
	bool running;	/* inside its poll callback (nesting guard) */
};

/*
 * A walk over the poll list in progress. Walks nest (a callback may run a
 * nested loop), so they form a stack; removing a poll fixes every walk that
 * points at it.
 */
struct evpoll_cursor {
	struct evpoll_cursor *prev;
	struct evpoll_poll *cur;
	struct evpoll_poll *next;
};

/*
 * Tracks one signal event of the context: tevent runs pending signal
 * handlers only for a context that has signal events (the handler list is
 * process-wide), and so must we.
 */
struct evpoll_sigtrack {
	struct evpoll_sigtrack *prev, *next;
	struct evpoll_state *st;	/* NULL once the context is gone */
};

/* The user's trace callbacks while a wait is open (trace.c). */
struct evpoll_trace {
	bool open;	/* BEFORE_WAIT emitted, AFTER_WAIT not yet */
	bool hooked;	/* our filters are installed */
	tevent_trace_callback_t point;
	void *point_pd;
	tevent_trace_fd_callback_t fd;
	void *fd_pd;
	tevent_trace_timer_callback_t timer;
	void *timer_pd;
	tevent_trace_signal_callback_t sig;
	void *sig_pd;
	tevent_trace_immediate_callback_t im;
	void *im_pd;
};

struct evpoll_fd_mute {
	tevent_trace_fd_callback_t cb;
	void *pd;
};

struct evpoll_state {
	struct evpoll_state *reg_next;	/* registry list */
	struct tevent_context *ev;
	struct evpoll_config cfg;
	struct evpoll_waker *waker;

	struct evpoll_poll *polls, *polls_tail;
	struct evpoll_cursor *cursors;

	/* an eventfd that always reads as ready, watched only while spinning */
	int spin_fd;
	struct tevent_fd *spin_fde;
	bool spin_fde_fired;
	/* set by the timer and signal trampolines during a dispatch */
	bool other_fired;

	bool spinning;
	bool activity_pending;
	char *env_report;	/* bad EVPOLL_* values, reported at first loop */
	unsigned pins;
	uint64_t spin_start_ns;
	uint64_t last_activity_ns;
	uint64_t last_check_ns;
	unsigned passes_since_check;
	uint64_t now_ns;		/* the last clock read while spinning */
	unsigned passes_since_clock;

	struct evpoll_sigtrack *sigtracks, *sigtracks_tail;
	unsigned nsignals;

	/* the process that owns the polls' enter/exit state */
	pid_t pid;
	struct evpoll_trace trace;

	struct evpoll_stats stats;
};

static inline uint64_t evpoll_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* registry.c */
int evpoll_registry_add(struct evpoll_state *st);
void evpoll_registry_remove(struct evpoll_state *st);
struct evpoll_state *evpoll_state_get(struct tevent_context *ev);

/* config.c */
void evpoll_config_load(struct evpoll_config *cfg, TALLOC_CTX *mem_ctx,
			char **report);
bool evpoll_config_valid(const struct evpoll_config *cfg);

/* poll.c */
int evpoll_run_polls(struct evpoll_state *st);
void evpoll_polls_enter(struct evpoll_state *st);
void evpoll_polls_exit(struct evpoll_state *st);
void evpoll_polls_detach(struct evpoll_state *st);

/* waker.c */
struct evpoll_waker *evpoll_waker_new(void);

/* spin.c */
void evpoll_spin_enter(struct evpoll_state *st, uint64_t now);
void evpoll_spin_exit(struct evpoll_state *st, uint64_t now);
void evpoll_spin_drop(struct evpoll_state *st);
bool evpoll_inherited(struct evpoll_state *st);
int evpoll_spin_once(struct evpoll_state *st, const char *location);
int evpoll_sleep_once(struct evpoll_state *st, const char *location);
bool evpoll_wants_spin(const struct evpoll_state *st);

/* trace.c */
void evpoll_wait_begin(struct evpoll_state *st);
void evpoll_wait_end(struct evpoll_state *st);
void evpoll_wait_abandon(struct evpoll_state *st);
void evpoll_trace_mute_fd(struct evpoll_state *st, struct evpoll_fd_mute *m);
void evpoll_trace_unmute_fd(struct evpoll_state *st,
			    struct evpoll_fd_mute *m);

/* backend.c */
extern const struct tevent_ops *evpoll_epoll_ops;
void evpoll_sigtracks_detach(struct evpoll_state *st);
void evpoll_state_inert(struct evpoll_state *st);

#endif
