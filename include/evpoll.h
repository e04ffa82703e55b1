/*
 * evpoll: a spin-mode tevent backend with poll callbacks.
 *
 * Copyright (C) 2026 The evproxy authors
 *
 * This library is free software; you can redistribute it and/or modify it
 * under the terms of the GNU Lesser General Public License as published by
 * the Free Software Foundation; either version 3 of the License, or (at
 * your option) any later version.  See COPYING.
 */

#ifndef EVPOLL_H
#define EVPOLL_H

#include <stdbool.h>
#include <stdint.h>
#include <talloc.h>
#include <tevent.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * @defgroup evpoll The evpoll backend
 *
 * "evpoll" is a tevent backend that wraps tevent's stock "epoll" backend.
 * After recent activity (a handler ran, a poll callback reported work, a
 * doorbell rang, evpoll_activity() was called) the loop spins for
 * evpoll_config::spin_ns instead of sleeping: every pass it calls the user's
 * poll callbacks, runs due immediates, and at least every 20 microseconds
 * (or every evpoll_config::poll_iterations passes) it checks fds, timers,
 * signals and cross-thread immediates through the epoll backend without
 * blocking. When nothing happened for spin_ns it sleeps in epoll_wait()
 * exactly like the epoll backend.
 *
 * An existing daemon opts in with one line:
 * @code
 *	evpoll_init();
 *	tevent_set_default_backend("evpoll");
 * @endcode
 *
 * Thread safety: a tevent context belongs to one thread (its owner). Unless
 * a function says "any thread", call it on the owner thread only.
 *
 * @{
 */

/** When the loop may spin instead of sleeping. */
enum evpoll_mode {
	/** Never spin: behaves as the epoll backend, polls never run. */
	EVPOLL_MODE_NEVER = 0,
	/** Spin for spin_ns after activity, then sleep (the default). */
	EVPOLL_MODE_AUTO = 1,
	/** Always spin, never sleep. */
	EVPOLL_MODE_ALWAYS = 2,
};

/** Configuration of an evpoll context. */
struct evpoll_config {
	/** When to spin. Default EVPOLL_MODE_AUTO. */
	enum evpoll_mode mode;
	/**
	 * How long the loop keeps spinning after the last activity, in
	 * nanoseconds. Default 200000 (200 us): waking a sleeping thread costs
	 * 25-60 us on the machines we measured, so a shorter spin rarely
	 * catches the next event before the peer would have slept anyway.
	 */
	uint64_t spin_ns;
	/**
	 * Maximum number of poll passes between two checks of fds, timers,
	 * signals and cross-thread immediates. Default 64. Whatever this value,
	 * they are also checked at least every 20 microseconds.
	 */
	unsigned poll_iterations;
};

/** Statistics of an evpoll context, see evpoll_get_stats(). */
struct evpoll_stats {
	/** calls of the backend's loop_once */
	uint64_t iterations;
	/** times the loop entered spin mode */
	uint64_t spin_entries;
	/** times the loop left spin mode */
	uint64_t spin_exits;
	/** nanoseconds spent in spin mode (completed spins and current one) */
	uint64_t spin_ns;
	/** times the loop went to wait in epoll_wait() with a timeout */
	uint64_t sleeps;
	/**
	 * fd handlers run by the epoll backend's wait (including tevent's
	 * internal fds, such as the cross-thread wake-up and signal pipe),
	 * and waits that ended without running a handler
	 */
	uint64_t fd_dispatches;
	/** timer handlers run */
	uint64_t timer_dispatches;
	/** immediate handlers run (cross-thread immediates included) */
	uint64_t immediate_dispatches;
	/** rounds of pending signal handlers run */
	uint64_t signal_dispatches;
	/** poll callback calls */
	uint64_t poll_calls;
	/** poll callback calls that reported work */
	uint64_t poll_work;
};

/**
 * Register the "evpoll" backend with tevent.
 *
 * Idempotent; safe from any thread and concurrently. It also performs
 * tevent's one-time backend setup under a lock, avoiding tevent's race
 * between threads that create their first contexts at the same time.
 *
 * @return true on success, false if tevent refused the registration or
 *         its epoll backend is missing.
 */
bool evpoll_init(void);

/**
 * Fill @p cfg with the defaults, including any operator overrides from the
 * environment: EVPOLL_MODE (never, auto, always), EVPOLL_SPIN_NS and
 * EVPOLL_POLL_ITERATIONS (decimal). Values are parsed strictly; a bad value
 * is reported through tevent's debug hook and ignored. Any thread.
 */
void evpoll_config_default(struct evpoll_config *cfg);

/**
 * Create an evpoll tevent context. Calls evpoll_init().
 *
 * @param mem_ctx	talloc parent of the context
 * @param cfg		configuration, NULL for evpoll_config_default()
 * @return the context (free it with talloc_free()), or NULL with errno
 *         set: EINVAL for an invalid @p cfg, ENOMEM, or the error of the
 *         epoll backend.
 *
 * Contexts made with tevent_context_init_byname(mem_ctx, "evpoll") or, after
 * tevent_set_default_backend("evpoll"), with tevent_context_init() are the
 * same, with the default configuration. Any thread; the calling thread
 * becomes the owner.
 */
struct tevent_context *evpoll_context_init(TALLOC_CTX *mem_ctx,
					   const struct evpoll_config *cfg);

/**
 * Change the configuration of an evpoll context. Owner thread.
 *
 * @return 0, or EINVAL (NULL argument, not an evpoll context, mode out of
 *         range, poll_iterations of 0).
 */
int evpoll_set_config(struct tevent_context *ev,
		      const struct evpoll_config *cfg);

/**
 * Read the configuration of an evpoll context. Owner thread.
 * @return 0, or EINVAL.
 */
int evpoll_get_config(struct tevent_context *ev, struct evpoll_config *cfg);

/** True if @p ev runs on the evpoll backend. Owner thread. */
bool evpoll_is_evpoll(struct tevent_context *ev);

/** Called when the loop enters spin mode. */
typedef void (*evpoll_enter_fn)(struct tevent_context *ev,
				void *private_data);
/** Called when the loop leaves spin mode, before it may sleep. */
typedef void (*evpoll_exit_fn)(struct tevent_context *ev,
			       void *private_data);
/**
 * Called on every pass while the loop spins.
 * @return the amount of work done; a value > 0 counts as activity.
 */
typedef int (*evpoll_poll_fn)(struct tevent_context *ev, void *private_data);

struct evpoll_poll;

/**
 * Add a poll callback to an evpoll context. Owner thread.
 *
 * While the loop spins, @p poll runs on every pass. @p enter runs when the
 * loop starts spinning (or at once, if the poll is added to a spinning
 * loop), @p exit when it stops spinning, before it may sleep; each exit
 * follows exactly one enter. A completion source typically disarms its
 * kernel notification in @p enter and re-arms it, then drains, in @p exit.
 *
 * Remove the poll with talloc_free(); this is safe from inside any
 * callback, including the poll's own. Removing a poll while the loop spins
 * runs its exit callback. A poll does not run re-entrantly: inside a nested
 * loop started from its own callback it is skipped.
 *
 * @param ev		an evpoll context
 * @param mem_ctx	talloc parent of the handle
 * @param enter		optional (NULL)
 * @param exit		optional (NULL)
 * @param poll		required
 * @param private_data	passed to every callback
 * @return the handle, or NULL with errno EINVAL (NULL @p ev or @p poll,
 *         not an evpoll context) or ENOMEM.
 */
struct evpoll_poll *evpoll_add_poll(struct tevent_context *ev,
				    TALLOC_CTX *mem_ctx,
				    evpoll_enter_fn enter,
				    evpoll_exit_fn exit,
				    evpoll_poll_fn poll,
				    void *private_data);

/**
 * Keep the loop spinning until the matching evpoll_unpin() (refcounted),
 * for example while requests are in flight. Owner thread. No effect on a
 * non-evpoll context or in EVPOLL_MODE_NEVER.
 */
void evpoll_pin(struct tevent_context *ev);

/**
 * Drop one evpoll_pin(). An unpin without a pin is reported through
 * tevent's debug hook and otherwise ignored. Owner thread.
 */
void evpoll_unpin(struct tevent_context *ev);

/**
 * Count as activity: a spinning loop keeps spinning for another spin_ns, a
 * loop that is not spinning starts at its next iteration. Owner thread.
 * (To wake a loop from another thread, ring a doorbell, see evproxy.h.)
 */
void evpoll_activity(struct tevent_context *ev);

/**
 * True while the loop is in spin mode. Owner thread.
 */
bool evpoll_is_spinning(struct tevent_context *ev);

/**
 * Read the statistics of an evpoll context. Owner thread.
 * @return 0, or EINVAL (NULL argument or not an evpoll context).
 */
int evpoll_get_stats(struct tevent_context *ev, struct evpoll_stats *st);

/**
 * @brief A loop's "may be asleep" flag, shared with other threads.
 *
 * A producer on another thread that has just published work in memory
 * (with a sequentially consistent atomic operation) asks
 * evpoll_waker_may_sleep(): if false, the loop is spinning and will see the
 * work in a poll callback, so no kernel wake-up is needed; if true, the
 * producer must wake the loop through the kernel (an eventfd the loop
 * watches). The loop sets the flag (sequentially consistent store) BEFORE
 * it runs its exit callbacks, whose last check of the work then pairs with
 * the producer's load: either the producer sees the flag set, or the exit
 * callback sees the work. A non-evpoll context, or NEVER mode, always
 * reports true.
 */
struct evpoll_waker;

/**
 * Get a reference to the waker of @p ev. Owner thread.
 * @return the waker (release with evpoll_waker_unref()), or NULL with
 *         errno EINVAL or ENOMEM. Works for any tevent context; for a
 *         non-evpoll context the flag is always set.
 */
struct evpoll_waker *evpoll_waker_get(struct tevent_context *ev);

/**
 * True if the loop may be sleeping and a kernel wake-up is needed. Any
 * thread, async-signal-safe; stays valid after the context is freed (then
 * it is always true).
 */
bool evpoll_waker_may_sleep(const struct evpoll_waker *w);

/** Drop a reference. Any thread. NULL is ignored. */
void evpoll_waker_unref(struct evpoll_waker *w);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* EVPOLL_H */
