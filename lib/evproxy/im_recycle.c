/*
 * Immediates of the tevent_thread_proxy drop-in go back to a sender.
 *
 * Why: a tevent_immediate is a chunk of about 300 bytes, outside glibc's
 * fastbins. A thread freeing such a chunk that another thread allocated
 * takes the allocating thread's arena lock; the destination freeing every
 * immediate while the sender allocates the next one under that same lock
 * makes the lock bounce between the cores (futex waits and wakes), which
 * capped the drop-in near a third of what the transport can carry. Freed
 * on a sending thread instead, an immediate goes into that thread's cache
 * (tcache) or its uncontended arena, where its next
 * tevent_create_immediate() finds it.
 *
 * Which: tevent's proxy frees an immediate after its handler unless the
 * handler stole it. Here, an immediate the handler left alone in every
 * respect (not stolen, not freed, not scheduled again, no destructor, no
 * children, no references) is returned; anything else is freed on the
 * destination right after the handler, exactly as before.
 *
 * How we know: before the handler the immediate becomes the only child of
 * a holder, and gets our destructor. tevent's proxy schedules every
 * immediate on the destination, which replaces any destructor it had, so
 * replacing it here changes nothing a program could rely on. After the
 * handler:
 * - the holder has no child: the handler stole or freed the immediate;
 * - more than one block under the holder: the immediate has children;
 * - a reference: talloc_reference_count();
 * - a destructor other than ours (tevent's, if the handler scheduled the
 *   immediate again; or the handler's own): talloc offers no way to read a
 *   destructor, so we ask talloc_free() with 'probing' naming the
 *   immediate. Our destructor refuses (returns -1) and clears itself, and
 *   the immediate is ours to return; any other destructor runs and the
 *   immediate is freed, which is what tevent's proxy would do with it.
 * Our destructor does nothing when not probing, so one left on an
 * immediate the handler stole costs only a call when it is freed later
 * (it points into this library: such an immediate must not outlive a
 * dlclose() of it).
 *
 * An immediate still scheduled somewhere when it was sent is cancelled
 * by the send (thread_proxy.c), as tevent's proxy does by scheduling it
 * on the destination, so it is never handed back while a context still
 * lists it.
 */
#include <stdbool.h>
#include <string.h>

#include "im_recycle.h"

/*
 * The immediate this thread is probing, and whether our destructor
 * answered. Thread-local: the probe and the destructor it triggers run on
 * the same thread. A destructor that is not ours may run user code that
 * probes again (a nested loop); each probe saves and restores both.
 */
static __thread const void *probing;
static __thread bool probe_hit;

static int im_watch_destructor(struct tevent_immediate *im)
{
	if (im != probing) {
		return 0;
	}
	probe_hit = true;
	talloc_set_destructor(im, NULL);
	/* refuse: the immediate stays, now without a destructor */
	return -1;
}

void im_recycle_watch(struct tevent_immediate *im)
{
	talloc_set_destructor(im, im_watch_destructor);
}

static void link_set(void *im, void *next)
{
	/* the body of an immediate nobody uses any more holds the link */
	memcpy(im, &next, sizeof(next));
}

static void *link_get(const void *im)
{
	void *next;

	memcpy(&next, im, sizeof(next));
	return next;
}

static bool left_alone(struct tevent_immediate *im, void *im_holder)
{
	const void *saved;
	bool saved_hit, hit;
	int ret;

	/* the holder and the immediate, nothing else */
	if (talloc_total_blocks(im_holder) != 2) {
		return false;
	}
	if (talloc_reference_count(im) != 0 ||
	    talloc_get_size(im) < sizeof(void *)) {
		return false;
	}
	saved = probing;
	saved_hit = probe_hit;
	probing = im;
	probe_hit = false;
	ret = talloc_free(im);
	hit = probe_hit;
	probing = saved;
	probe_hit = saved_hit;
	/* else freed by another destructor, or refused by one: not ours */
	return ret == -1 && hit;
}

bool im_recycle_take(struct tevent_immediate *im, void *im_holder,
		     struct im_chain *c)
{
	if (!left_alone(im, im_holder)) {
		talloc_free_children(im_holder);
		return false;
	}
	talloc_steal(NULL, im);
	link_set(im, NULL);
	if (c->head == NULL) {
		c->head = im;
	} else {
		link_set(c->tail, im);
	}
	c->tail = im;
	return true;
}

void im_recycle_free_chain(struct im_chain *c)
{
	void *im = c->head;

	while (im != NULL) {
		void *next = link_get(im);

		talloc_free(im);
		im = next;
	}
	c->head = NULL;
	c->tail = NULL;
}

void im_recycle_publish(struct im_return *r, struct im_chain *c)
{
	void *expected = NULL;

	if (c->head == NULL) {
		return;
	}
	/* release: pairs with the acquire exchange in im_recycle_collect */
	if (atomic_compare_exchange_strong_explicit(&r->chain, &expected,
						    c->head,
						    memory_order_release,
						    memory_order_relaxed)) {
		c->head = NULL;
		c->tail = NULL;
		return;
	}
	/* the senders have not taken the last one: do not pile up */
	im_recycle_free_chain(c);
}

void im_recycle_collect(struct im_return *r)
{
	struct im_chain c = { NULL, NULL };

	/* relaxed peek: the exchange below does the synchronising */
	if (atomic_load_explicit(&r->chain, memory_order_relaxed) == NULL) {
		return;
	}
	/* acquire: pairs with the release CAS in im_recycle_publish */
	c.head = atomic_exchange_explicit(&r->chain, NULL,
					  memory_order_acquire);
	im_recycle_free_chain(&c);
}
