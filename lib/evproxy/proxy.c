/*
 * evproxy: cross-thread messages onto a tevent loop.
 *
 * Senders push into an evq (queue.c) and wake the destination only when it
 * announced itself idle (see 'idle' in proxy_internal.h). The destination
 * drains through an internal doorbell: its tevent_fd when the loop sleeps,
 * and, on an evpoll loop that spins, a poll callback that reads the queue
 * directly, so a spinning destination costs senders no syscall and no
 * write to a line the destination writes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "evpoll.h"
#include "evwatch.h"
#include "frame.h"
#include "pid.h"
#include "proxy_internal.h"

#define EVPROXY_DEFAULT_BATCH 128

/* Inherited across fork(): the queue and its senders are the parent's. */
static bool core_inherited(const struct evproxy_sender *s)
{
	return s->pid != evproxy_pid();
}

static void core_release(struct evproxy_sender *s)
{
	struct evq_item item;

	if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) !=
	    1) {
		return;
	}
	/* nobody can push any more: free what is left */
	while (evq_pop(&s->q, &item)) {
		evproxy_item_free(s->kind, &item);
	}
	/* immediates no sender took */
	im_recycle_collect(&s->recycled);
	evq_destroy(&s->q);
	evproxy_ringer_unref(s->ringer);
	pthread_mutex_destroy(&s->wait_lock);
	free(s);
}

void evproxy_item_free(enum evproxy_kind kind, const struct evq_item *item)
{
	talloc_free(item->msg);
	if (kind == EVPROXY_IMMEDIATES) {
		talloc_free(item->private_data);
	}
}

int evproxy_push(struct evproxy_sender *s, const struct evq_item *item)
{
	int ret;

	if (core_inherited(s)) {
		/* the destination is not here */
		return ECANCELED;
	}
	ret = evq_push(&s->q, item);
	if (ret != 0) {
		return ret;
	}
	/* published, then the light barrier, then load: see 'idle' */
	asym_light_barrier(s->asym);
	if (atomic_load_explicit(&s->idle, memory_order_relaxed) &&
	    atomic_exchange_explicit(&s->idle, false, memory_order_relaxed)) {
		evproxy_ringer_ring(s->ringer);
	}
	return 0;
}

/*
 * The destination stops looking at the queue until woken. Returns true if
 * it must keep draining: an item arrived meanwhile.
 */
static bool go_idle(struct evproxy_sender *s)
{
	/* store, heavy barrier, then the loads in evq_ready: see 'idle' */
	atomic_store_explicit(&s->idle, true, memory_order_relaxed);
	asym_heavy_barrier(s->asym);
	if (!evq_ready(&s->q)) {
		return false;
	}
	/*
	 * If a sender won the exchange it rang the doorbell too; draining
	 * now is still right, the ring then finds less or nothing.
	 */
	atomic_store_explicit(&s->idle, false, memory_order_relaxed);
	return true;
}

/* What one drain holds while a handler runs; spares are kept in p. */
struct drain_ctx {
	void *holder;		/* the message, or the private pointer */
	void *im_holder;	/* EVPROXY_IMMEDIATES: the immediate alone */
	struct im_chain recycle;	/* immediates going back to senders */
};

static bool holder_take(void **spare, void **holder)
{
	*holder = *spare;
	*spare = NULL;		/* a nested drain makes its own */
	if (*holder == NULL) {
		*holder = talloc_new(NULL);
	}
	return *holder != NULL;
}

static void holder_give_back(void **spare, void *holder)
{
	if (*spare == NULL) {
		*spare = holder;
	} else {
		talloc_free(holder);
	}
}

/* Deliver one item. Does not touch p after the handler. */
static void deliver(struct evproxy *p, const struct evq_item *item,
		    struct drain_ctx *d)
{
	p->delivered++;
	/* the item belongs to this thread now: hold it while the handler runs */
	if (p->core->kind == EVPROXY_MESSAGES) {
		evproxy_msg_handler_t fn = (evproxy_msg_handler_t)item->fn;

		talloc_steal(d->holder, item->msg);
		fn(p->ev, item->msg, item->private_data);
	} else {
		tevent_immediate_handler_t fn =
			(tevent_immediate_handler_t)item->fn;
		struct tevent_immediate *im = item->msg;

		talloc_steal(d->im_holder, im);
		talloc_steal(d->holder, item->private_data);
		im_recycle_watch(im);
		fn(p->ev, im, item->private_data);
		im_recycle_take(im, d->im_holder, &d->recycle);
	}
	/* whatever the handler did not steal goes now */
	talloc_free_children(d->holder);
}

static void consume(struct evproxy *p);

/*
 * The continuation: scheduled (an immediate, no syscall) while a drain
 * runs handlers. If a handler runs a nested loop, the nested loop runs it
 * and takes the draining over: the messages queued behind are delivered
 * there, and, the queue drained, the destination goes idle so that new
 * sends wake the nested loop. Otherwise it is cancelled when the drain ends.
 */
static void cont_handler(struct tevent_context *ev,
			 struct tevent_immediate *im, void *private_data)
{
	struct evproxy *p = private_data;

	p->cont_runs++;
	consume(p);
}

/*
 * Deliver up to max items. Returns the number delivered; *freed tells
 * whether a handler freed the evproxy (then p must not be touched).
 */
static unsigned drain(struct evproxy *p, unsigned max, bool *freed)
{
	struct evproxy_sender *s = p->core;
	struct evq_item item;
	struct evproxy_frame frame;
	struct drain_ctx d = { NULL, NULL, { NULL, NULL } };
	uint64_t runs = p->cont_runs;
	unsigned n = 0;

	*freed = false;
	if (!holder_take(&p->spare_holder, &d.holder)) {
		return 0;
	}
	if (s->kind == EVPROXY_IMMEDIATES &&
	    !holder_take(&p->spare_im_holder, &d.im_holder)) {
		holder_give_back(&p->spare_holder, d.holder);
		return 0;
	}
	evproxy_frame_push(&p->frames, &frame);
	tevent_schedule_immediate(p->cont_im, p->ev, cont_handler, p);
	while (n < max && evq_pop(&s->q, &item)) {
		n++;
		deliver(p, &item, &d);
		if (frame.freed || p->cont_runs != runs) {
			/* freed, or a nested loop took the draining over */
			break;
		}
	}
	if (frame.freed) {
		*freed = true;
		talloc_free(d.holder);
		talloc_free(d.im_holder);
		/* the senders' side may be gone with p */
		im_recycle_free_chain(&d.recycle);
		return n;
	}
	if (p->cont_runs == runs) {
		/* cancel the continuation */
		tevent_schedule_immediate(p->cont_im, p->ev, NULL, NULL);
	}
	evproxy_frame_pop(&p->frames, &frame);
	holder_give_back(&p->spare_holder, d.holder);
	if (d.im_holder != NULL) {
		holder_give_back(&p->spare_im_holder, d.im_holder);
	}
	im_recycle_publish(&s->recycled, &d.recycle);
	if (n > 0) {
		p->batches++;
		/* the slots go back to the producers, then waiters hear it */
		evq_flush(&s->q);
		evproxy_wake_waiters(s);
	}
	return n;
}

/*
 * Before a loop that is not spinning goes idle (a heavy barrier: with
 * membarrier a system call that interrupts every other running thread of
 * the process), it looks at the queue a little longer: under a stream of
 * messages the next one is usually this close, and finding it here costs
 * neither side anything. Bounded by polls, not time: a poll is a load of
 * a line the sender writes and a pause.
 */
#define EVPROXY_LINGER_POLLS 64

/* a spin-wait hint to the CPU */
static inline void evproxy_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#else
	atomic_signal_fence(memory_order_seq_cst);
#endif
}

static bool linger(struct evq *q)
{
	unsigned i;

	for (i = 0; i < EVPROXY_LINGER_POLLS; i++) {
		if (evq_ready(q)) {
			return true;
		}
		evproxy_cpu_relax();
	}
	return false;
}

/*
 * Drain up to a batch (lingering between drains, see linger()), then
 * either come back later (more is queued: ring our own doorbell, so other
 * events run first), rely on the spinning loop's poll, or go idle.
 */
static void consume(struct evproxy *p)
{
	unsigned budget = p->batch;
	bool freed;
	unsigned n;

	if (core_inherited(p->core)) {
		return;
	}
	for (;;) {
		n = drain(p, budget, &freed);
		if (freed) {
			return;
		}
		budget -= n;
		if (budget == 0) {
			if (evq_ready(&p->core->q)) {
				evproxy_ring_doorbell(p->db);
				return;
			}
			break;
		}
		if (p->poll != NULL && evpoll_is_spinning(p->ev)) {
			/* the poll callback watches the queue while spinning */
			return;
		}
		if (n == 0 || !linger(&p->core->q)) {
			break;
		}
	}
	if (go_idle(p->core)) {
		evproxy_ring_doorbell(p->db);
	}
}

/* The doorbell: rung by senders when the destination was idle. */
static void doorbell_handler(struct tevent_context *ev,
			     struct evproxy_doorbell *db, uint64_t rings,
			     void *private_data)
{
	consume(private_data);
}

/* evpoll: while the loop spins, read the queue directly. */
static void poll_enter(struct tevent_context *ev, void *private_data)
{
	struct evproxy *p = private_data;

	atomic_store_explicit(&p->core->idle, false, memory_order_relaxed);
}

static int poll_queue(struct tevent_context *ev, void *private_data)
{
	struct evproxy *p = private_data;
	bool freed;

	if (core_inherited(p->core) || !evq_ready(&p->core->q)) {
		/* inherited, or nothing queued */
		return 0;
	}
	return (int)drain(p, p->batch, &freed);
}

static void poll_exit(struct tevent_context *ev, void *private_data)
{
	struct evproxy *p = private_data;

	if (go_idle(p->core)) {
		/* an item slipped in: the loop must not sleep on it */
		evproxy_ring_doorbell(p->db);
	}
}

/*
 * No more deliveries: later sends get ECANCELED, queued items are freed,
 * waiting senders are woken to see ECANCELED. Runs when the evproxy or its
 * loop is freed, whichever comes first.
 */
static void evproxy_shutdown(struct evproxy *p)
{
	struct evproxy_sender *s = p->core;
	struct evq_item item;

	if (p->shut) {
		return;
	}
	p->shut = true;
	if (core_inherited(s)) {
		/*
		 * The parent's senders do not exist here, so a claimed slot
		 * would never be published and the growth mutex may be held
		 * forever. Leave the queue alone.
		 */
		return;
	}
	/* later sends fail; what was claimed before is drained here */
	evq_kill(&s->q);
	while (evq_pop_final(&s->q, &item)) {
		evproxy_item_free(s->kind, &item);
		atomic_fetch_add_explicit(&s->discarded, 1,
					  memory_order_relaxed);
	}
	/* waiting senders retry and get ECANCELED */
	evproxy_wake_waiters(s);
}

static void loop_gone(void *private_data)
{
	struct evproxy *p = private_data;

	p->watch = NULL;
	evproxy_shutdown(p);
}

static int evproxy_destructor(struct evproxy *p)
{
	evproxy_frames_freed(p->frames);
	evproxy_evwatch_cancel(p->watch);
	evproxy_shutdown(p);
	TALLOC_FREE(p->poll);
	TALLOC_FREE(p->db);
	TALLOC_FREE(p->cont_im);
	talloc_free(p->spare_holder);
	talloc_free(p->spare_im_holder);
	core_release(p->core);
	return 0;
}

static struct evproxy_sender *core_new(const struct evproxy_config *cfg,
				       enum evproxy_kind kind)
{
	struct evproxy_sender *s = aligned_alloc(64, sizeof(*s));

	if (s == NULL) {
		return NULL;
	}
	memset(s, 0, sizeof(*s));
	if (evq_init(&s->q, cfg->capacity) != 0) {
		free(s);
		return NULL;
	}
	if (pthread_mutex_init(&s->wait_lock, NULL) != 0) {
		evq_destroy(&s->q);
		free(s);
		return NULL;
	}
	s->kind = kind;
	evproxy_pid_init();
	s->pid = evproxy_pid();
	atomic_init(&s->refs, 1);
	s->asym = asym_init();
	atomic_init(&s->idle, true);
	atomic_init(&s->nwaiters, 0);
	atomic_init(&s->discarded, 0);
	atomic_init(&s->recycled.chain, NULL);
	return s;
}

struct evproxy *evproxy_create_kind(TALLOC_CTX *mem_ctx,
				    struct tevent_context *dest_ev,
				    const struct evproxy_config *cfg,
				    enum evproxy_kind kind)
{
	struct evproxy_config defaults;
	struct evproxy *p;
	int err;

	if (cfg == NULL) {
		evproxy_config_default(&defaults);
		cfg = &defaults;
	}
	if (dest_ev == NULL || cfg->batch == 0) {
		errno = EINVAL;
		return NULL;
	}
	p = talloc_zero(mem_ctx, struct evproxy);
	if (p == NULL) {
		errno = ENOMEM;
		return NULL;
	}
	p->ev = dest_ev;
	p->batch = cfg->batch;
	p->cont_im = tevent_create_immediate(p);
	if (p->cont_im == NULL) {
		talloc_free(p);
		errno = ENOMEM;
		return NULL;
	}
	p->core = core_new(cfg, kind);
	if (p->core == NULL) {
		talloc_free(p);
		errno = ENOMEM;
		return NULL;
	}
	p->db = evproxy_add_doorbell(dest_ev, p, doorbell_handler, p);
	if (p->db == NULL) {
		err = errno;
		core_release(p->core);
		talloc_free(p);
		errno = err;
		return NULL;
	}
	p->core->ringer = evproxy_doorbell_ringer(p->db);
	talloc_set_destructor(p, evproxy_destructor);
	p->watch = evproxy_evwatch_new(dest_ev, loop_gone, p);
	if (p->watch == NULL) {
		talloc_free(p);
		errno = ENOMEM;
		return NULL;
	}
	if (evpoll_is_evpoll(dest_ev)) {
		p->poll = evpoll_add_poll(dest_ev, p, poll_enter, poll_exit,
					  poll_queue, p);
		if (p->poll == NULL) {
			talloc_free(p);
			errno = ENOMEM;
			return NULL;
		}
	}
	return p;
}

_PUBLIC_ void evproxy_config_default(struct evproxy_config *cfg)
{
	if (cfg == NULL) {
		return;
	}
	cfg->capacity = 0;
	cfg->batch = EVPROXY_DEFAULT_BATCH;
}

_PUBLIC_ struct evproxy *evproxy_create(TALLOC_CTX *mem_ctx,
					struct tevent_context *dest_ev,
					const struct evproxy_config *cfg)
{
	return evproxy_create_kind(mem_ctx, dest_ev, cfg, EVPROXY_MESSAGES);
}

_PUBLIC_ struct evproxy_sender *evproxy_sender(struct evproxy *p)
{
	if (p == NULL) {
		errno = EINVAL;
		return NULL;
	}
	return evproxy_sender_ref(p->core);
}

_PUBLIC_ struct evproxy_sender *evproxy_sender_ref(struct evproxy_sender *s)
{
	if (s != NULL) {
		atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
	}
	return s;
}

_PUBLIC_ void evproxy_sender_unref(struct evproxy_sender *s)
{
	if (s != NULL) {
		core_release(s);
	}
}

_PUBLIC_ int evproxy_send(struct evproxy_sender *s,
			  evproxy_msg_handler_t handler, void *private_data,
			  void *pmsg)
{
	void **pp = pmsg;
	struct evq_item item;
	int ret;

	if (s == NULL || handler == NULL || pp == NULL || *pp == NULL ||
	    s->kind != EVPROXY_MESSAGES) {
		return EINVAL;
	}
	ret = evproxy_msg_check(*pp);
	if (ret != 0) {
		return ret;
	}
	item.msg = *pp;
	item.fn = (void *)handler;
	item.private_data = private_data;
	ret = evproxy_push(s, &item);
	if (ret == 0) {
		*pp = NULL;
	}
	return ret;
}

_PUBLIC_ int evproxy_get_stats(struct evproxy *p, struct evproxy_stats *st)
{
	struct evproxy_doorbell_stats dbs;

	if (p == NULL || st == NULL) {
		return EINVAL;
	}
	evproxy_doorbell_get_stats(p->db, &dbs);
	st->delivered = p->delivered;
	st->discarded = atomic_load_explicit(&p->core->discarded,
					     memory_order_relaxed);
	st->kernel_wakeups = dbs.kernel_wakeups;
	st->batches = p->batches;
	return 0;
}
