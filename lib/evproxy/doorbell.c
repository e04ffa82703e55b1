/*
 * Doorbells.
 *
 * Two objects: the doorbell (talloc, owner thread) and its ringer, the part
 * other threads touch (malloc, refcounted, never freed while a reference
 * exists). The ringer holds the pending count, the eventfd and a reference
 * to the owner loop's evpoll_waker, so a ring never reads freed memory and
 * never writes to a closed (possibly reused) fd number.
 *
 * The pending word: the low 63 bits count rings not yet delivered, the top
 * bit is set once the doorbell is freed. Every ring is one seq_cst fetch-add
 * on it; its result says at once whether the doorbell is dead (ECANCELED),
 * already pending (done, no syscall), or newly pending (then maybe wake).
 *
 * Why no wake-up is lost (three cases for the ring that makes the count
 * non-zero, R, and the loop L):
 * 1. L sleeps (or is not an evpoll loop): R's seq_cst load of the waker
 *    reads "may sleep" and R writes the eventfd. L's fd handler drains the
 *    eventfd BEFORE it exchanges the count with 0, so a ring that lands
 *    after the exchange sees 0 and writes again.
 * 2. L spins: R reads "no sleep" and skips the write; L's poll callback runs
 *    every pass and sees the count.
 * 3. L is about to stop spinning: L stores "may sleep" (seq_cst) and then
 *    its exit callback loads the count (seq_cst). R did fetch-add (seq_cst)
 *    then load of the flag (seq_cst). In the single total order of seq_cst
 *    operations, if R's load precedes L's store then R's fetch-add also
 *    precedes L's load, so L's exit callback sees the ring and writes the
 *    eventfd itself; otherwise R sees "may sleep" and writes.
 */
#include <errno.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "evpoll.h"
#include "evproxy.h"
#include "evwatch.h"
#include "frame.h"
#include "pid.h"
#include "visibility.h"

#define PENDING_DEAD (1ULL << 63)
#define PENDING_COUNT (PENDING_DEAD - 1)

/*
 * Field layout: what ringers only read (pid, efd, waker) shares no cache
 * line with the pending word, which producer and consumer both modify; the
 * statistics counter, written only on the slow path, has a line of its own.
 */
struct evproxy_ringer {
	/*
	 * relaxed increments (the caller holds a reference); acq_rel
	 * decrement so the last owner sees every other use before the free.
	 */
	atomic_uint refs;
	/*
	 * Set (seq_cst) on the owner thread by evproxy_doorbell_fd(), which
	 * then rechecks the pending word (seq_cst), see there.
	 */
	atomic_bool fd_exported;
	int efd;
	pid_t pid;
	struct evpoll_waker *waker;
	/* see the comment at the top of the file */
	alignas(64) atomic_uint_fast64_t pending;
	/* relaxed: statistics only. Eventfd writes made by rings ... */
	alignas(64) atomic_uint_fast64_t ring_wakeups;
	/* ... and by the owner side (exit callback, exported fd) */
	atomic_uint_fast64_t other_wakeups;
};

struct evproxy_doorbell {
	struct tevent_context *ev;
	struct evproxy_evwatch *watch;	/* marks the ringer dead with ev */
	struct evproxy_ringer *r;
	struct tevent_fd *fde;
	struct evpoll_poll *poll;
	evproxy_doorbell_handler_t handler;
	void *private_data;
	uint64_t delivered;
	uint64_t handler_calls;
	/* deliveries in progress (nested loops nest them) */
	struct evproxy_frame *frames;
};

static void ringer_release(struct evproxy_ringer *r)
{
	if (atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1) {
		return;
	}
	evpoll_waker_unref(r->waker);
	close(r->efd);
	free(r);
}

/* True in a process that inherited the doorbell: it is dead here. */
static bool inherited(const struct evproxy_ringer *r)
{
	return r->pid != evproxy_pid();
}

/*
 * Write the eventfd. Never from a process that inherited the doorbell
 * across fork(): the eventfd is shared with the parent, whose loop would
 * wake (or, worse, a child draining it would steal the parent's wake-up).
 */
static int wake(struct evproxy_ringer *r, atomic_uint_fast64_t *counter)
{
	uint64_t one = 1;
	ssize_t n;

	if (inherited(r)) {
		return ECANCELED;
	}
	do {
		n = write(r->efd, &one, sizeof(one));
	} while (n == -1 && errno == EINTR);
	if (n == -1 && errno != EAGAIN) {
		/* EAGAIN: the counter is at its maximum, so already readable */
		return errno;
	}
	atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
	return 0;
}

static int ring(struct evproxy_ringer *r)
{
	uint_fast64_t old;
	int saved_errno = errno;	/* async-signal-safety */
	int ret = 0;

	if (inherited(r)) {
		return ECANCELED;
	}
	/* seq_cst: pairs with the loop's seq_cst store of "may sleep" */
	old = atomic_fetch_add_explicit(&r->pending, 1, memory_order_seq_cst);
	if (old & PENDING_DEAD) {
		return ECANCELED;
	}
	if ((old & PENDING_COUNT) != 0) {
		return 0;
	}
	/* seq_cst: pairs with the store and recheck in evproxy_doorbell_fd */
	if (atomic_load_explicit(&r->fd_exported, memory_order_seq_cst) ||
	    evpoll_waker_may_sleep(r->waker)) {
		ret = wake(r, &r->ring_wakeups);
	}
	errno = saved_errno;
	return ret;
}

static void drain(struct evproxy_ringer *r)
{
	uint64_t v;
	ssize_t n;

	do {
		n = read(r->efd, &v, sizeof(v));
	} while (n == -1 && errno == EINTR);
}

/*
 * Take the pending rings and run the handler. Returns the number delivered.
 * The doorbell may be freed by the handler; it is not touched afterwards.
 */
static uint64_t deliver(struct evproxy_doorbell *db)
{
	uint_fast64_t n;
	struct evproxy_frame frame;

	/* acquire: see what ringers published before their rings */
	n = atomic_exchange_explicit(&db->r->pending, 0, memory_order_acquire);
	n &= PENDING_COUNT;
	if (n == 0) {
		return 0;
	}
	db->delivered += n;
	db->handler_calls++;
	evproxy_frame_push(&db->frames, &frame);
	db->handler(db->ev, db, n, db->private_data);
	if (!frame.freed) {
		evproxy_frame_pop(&db->frames, &frame);
	}
	return n;
}

static void doorbell_fd_handler(struct tevent_context *ev,
				struct tevent_fd *fde, uint16_t flags,
				void *private_data)
{
	struct evproxy_doorbell *db = private_data;

	if (inherited(db->r)) {
		/* leave the shared eventfd to the parent; stop watching it */
		tevent_fd_set_flags(fde, 0);
		return;
	}
	/* drain first, then take the count: see case 1 above */
	drain(db->r);
	deliver(db);
}

static int doorbell_poll(struct tevent_context *ev, void *private_data)
{
	struct evproxy_doorbell *db = private_data;

	if (inherited(db->r)) {
		return 0;
	}
	if (atomic_load_explicit(&db->r->fd_exported, memory_order_relaxed)) {
		/* keep "readable while pending" true for the foreign loop */
		if ((atomic_load_explicit(&db->r->pending,
					  memory_order_relaxed) &
		     PENDING_COUNT) == 0) {
			return 0;
		}
		drain(db->r);
	}
	/*
	 * The exchange keeps the pending line in this core's cache while
	 * idle, so a ring costs one line transfer to the ringer and one back.
	 */
	return deliver(db) > 0 ? 1 : 0;
}

static void doorbell_poll_exit(struct tevent_context *ev, void *private_data)
{
	struct evproxy_doorbell *db = private_data;

	/* seq_cst: case 3 above */
	if ((atomic_load_explicit(&db->r->pending, memory_order_seq_cst) &
	     PENDING_COUNT) != 0) {
		wake(db->r, &db->r->other_wakeups);
	}
}

/* Rings from now on return ECANCELED; pending ones are discarded. */
static void mark_dead(struct evproxy_ringer *r)
{
	atomic_fetch_or_explicit(&r->pending, PENDING_DEAD,
				 memory_order_seq_cst);
}

/* The loop was freed before the doorbell: nothing can deliver any more. */
static void loop_gone(void *private_data)
{
	struct evproxy_doorbell *db = private_data;

	db->watch = NULL;
	mark_dead(db->r);
}

static int doorbell_destructor(struct evproxy_doorbell *db)
{
	evproxy_frames_freed(db->frames);
	mark_dead(db->r);
	evproxy_evwatch_cancel(db->watch);
	TALLOC_FREE(db->poll);
	TALLOC_FREE(db->fde);
	ringer_release(db->r);
	return 0;
}

_PUBLIC_ struct evproxy_doorbell *evproxy_add_doorbell(
	struct tevent_context *ev, TALLOC_CTX *mem_ctx,
	evproxy_doorbell_handler_t handler, void *private_data)
{
	struct evproxy_doorbell *db;
	struct evproxy_ringer *r;
	int err;

	if (ev == NULL || handler == NULL) {
		errno = EINVAL;
		return NULL;
	}
	evproxy_pid_init();

	r = aligned_alloc(64, sizeof(*r));
	if (r == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	atomic_init(&r->refs, 1);
	atomic_init(&r->pending, 0);
	atomic_init(&r->ring_wakeups, 0);
	atomic_init(&r->other_wakeups, 0);
	atomic_init(&r->fd_exported, false);
	r->pid = evproxy_pid();
	r->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (r->efd == -1) {
		err = errno;
		free(r);
		errno = err;
		return NULL;
	}
	r->waker = evpoll_waker_get(ev);
	if (r->waker == NULL) {
		close(r->efd);
		free(r);
		errno = ENOMEM;
		return NULL;
	}

	db = talloc_zero(mem_ctx, struct evproxy_doorbell);
	if (db == NULL) {
		ringer_release(r);
		errno = ENOMEM;
		return NULL;
	}
	db->ev = ev;
	db->r = r;
	db->handler = handler;
	db->private_data = private_data;
	talloc_set_destructor(db, doorbell_destructor);

	db->watch = evproxy_evwatch_new(ev, loop_gone, db);
	db->fde = tevent_add_fd(ev, db, r->efd, TEVENT_FD_READ,
				doorbell_fd_handler, db);
	if (db->watch == NULL || db->fde == NULL) {
		talloc_free(db);
		errno = ENOMEM;
		return NULL;
	}
	if (evpoll_is_evpoll(ev)) {
		db->poll = evpoll_add_poll(ev, db, NULL, doorbell_poll_exit,
					   doorbell_poll, db);
		if (db->poll == NULL) {
			talloc_free(db);
			errno = ENOMEM;
			return NULL;
		}
	}
	return db;
}

_PUBLIC_ int evproxy_ring_doorbell(struct evproxy_doorbell *db)
{
	if (db == NULL) {
		return EINVAL;
	}
	return ring(db->r);
}

_PUBLIC_ int evproxy_doorbell_fd(struct evproxy_doorbell *db)
{
	if (db == NULL) {
		errno = EINVAL;
		return -1;
	}
	if (!atomic_load_explicit(&db->r->fd_exported, memory_order_relaxed)) {
		atomic_store_explicit(&db->r->fd_exported, true,
				      memory_order_seq_cst);
		/* a ring that skipped the write just before: make it visible */
		if ((atomic_load_explicit(&db->r->pending,
					  memory_order_seq_cst) &
		     PENDING_COUNT) != 0) {
			wake(db->r, &db->r->other_wakeups);
		}
	}
	return db->r->efd;
}

_PUBLIC_ struct evproxy_ringer *evproxy_doorbell_ringer(
	struct evproxy_doorbell *db)
{
	if (db == NULL) {
		errno = EINVAL;
		return NULL;
	}
	return evproxy_ringer_ref(db->r);
}

_PUBLIC_ int evproxy_ringer_ring(struct evproxy_ringer *r)
{
	if (r == NULL) {
		return EINVAL;
	}
	return ring(r);
}

_PUBLIC_ struct evproxy_ringer *evproxy_ringer_ref(struct evproxy_ringer *r)
{
	if (r != NULL) {
		atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
	}
	return r;
}

_PUBLIC_ void evproxy_ringer_unref(struct evproxy_ringer *r)
{
	if (r != NULL) {
		ringer_release(r);
	}
}

_PUBLIC_ int evproxy_doorbell_get_stats(struct evproxy_doorbell *db,
					struct evproxy_doorbell_stats *st)
{
	uint_fast64_t word, by_rings;

	if (db == NULL || st == NULL) {
		return EINVAL;
	}
	word = atomic_load_explicit(&db->r->pending, memory_order_relaxed);
	/* once dead, the count holds refused rings: report nothing pending */
	st->pending = (word & PENDING_DEAD) ? 0 : (word & PENDING_COUNT);
	st->rings = db->delivered + st->pending;
	st->handler_calls = db->handler_calls;
	by_rings = atomic_load_explicit(&db->r->ring_wakeups,
					memory_order_relaxed);
	st->ring_wakeups = by_rings;
	st->kernel_wakeups = by_rings +
			     atomic_load_explicit(&db->r->other_wakeups,
						  memory_order_relaxed);
	/*
	 * Every successful ring either wrote the eventfd or avoided it
	 * (rings discarded when the loop went away aside).
	 */
	st->wakeups_avoided = st->rings > by_rings ? st->rings - by_rings : 0;
	return 0;
}
