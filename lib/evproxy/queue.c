/*
 * evq: see queue.h for the design and the memory-ordering pairs.
 */
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "queue.h"

#define EVQ_SEALED (1ULL << 63)
#define EVQ_DEAD (1ULL << 62)
#define EVQ_POS(tail) ((tail) & ~(EVQ_SEALED | EVQ_DEAD))

/* a slot's sequence word once position 'pos' is published in it */
#define PUBLISHED(pos) ((uint64_t)(pos) + 1)
#define EVQ_FIRST_RING 1024
/* the consumer publishes its head at least this often */
#define EVQ_PUBLISH_EVERY 64

static struct evq_ring *ring_new(uint64_t size)
{
	struct evq_ring *r;
	size_t bytes = sizeof(*r) + size * sizeof(struct evq_slot);

	if (size == 0 || size > (SIZE_MAX - sizeof(*r) - 63) /
	    sizeof(struct evq_slot)) {
		return NULL;
	}
	/* aligned_alloc wants a multiple of the alignment */
	bytes = (bytes + 63) & ~(size_t)63;
	r = aligned_alloc(64, bytes);
	if (r == NULL) {
		return NULL;
	}
	/* all zero: no slot holds PUBLISHED(pos) for a pos of the first lap */
	memset(r, 0, bytes);
	r->size = size;
	r->mask = (size & (size - 1)) == 0 ? size - 1 : 0;
	atomic_init(&r->tail, 0);
	atomic_init(&r->head_seen, 0);
	atomic_init(&r->head, 0);
	atomic_init(&r->next, NULL);
	return r;
}

static inline struct evq_slot *slot_at(struct evq_ring *r, uint64_t pos)
{
	if (r->mask != 0 || r->size == 1) {
		return &r->slots[pos & r->mask];
	}
	return &r->slots[pos % r->size];
}

int evq_init(struct evq *q, uint64_t capacity)
{
	struct evq_ring *r;

	memset(q, 0, sizeof(*q));
	q->bounded = capacity != 0;
	r = ring_new(q->bounded ? capacity : EVQ_FIRST_RING);
	if (r == NULL) {
		return ENOMEM;
	}
	if (pthread_mutex_init(&q->grow_lock, NULL) != 0) {
		free(r);
		return ENOMEM;
	}
	atomic_init(&q->cur, r);
	q->first = r;
	return 0;
}

void evq_destroy(struct evq *q)
{
	struct evq_ring *r, *next;

	for (r = q->retired; r != NULL; r = next) {
		next = r->retired_next;
		free(r);
	}
	for (r = q->first; r != NULL; r = next) {
		next = atomic_load_explicit(&r->next, memory_order_relaxed);
		free(r);
	}
	pthread_mutex_destroy(&q->grow_lock);
	q->first = NULL;
	q->retired = NULL;
}

/*
 * Link a ring twice the size after 'full' and seal 'full'. NULL with *err
 * ENOMEM, or ECANCELED once the queue is killed.
 */
static struct evq_ring *grow(struct evq *q, struct evq_ring *full, int *err)
{
	struct evq_ring *next;

	pthread_mutex_lock(&q->grow_lock);
	next = atomic_load_explicit(&full->next, memory_order_acquire);
	if (next == NULL) {
		if (q->killed) {
			pthread_mutex_unlock(&q->grow_lock);
			*err = ECANCELED;
			return NULL;
		}
		next = ring_new(full->size * 2);
		if (next == NULL) {
			pthread_mutex_unlock(&q->grow_lock);
			*err = ENOMEM;
			return NULL;
		}
		/* release: the new ring's contents before its address */
		atomic_store_explicit(&full->next, next, memory_order_release);
		atomic_store_explicit(&q->cur, next, memory_order_release);
		/*
		 * Seal after linking: whoever sees the sealed bit (acquire,
		 * or a failed CAS with acquire) finds next.
		 */
		atomic_fetch_or_explicit(&full->tail, EVQ_SEALED,
					 memory_order_acq_rel);
	}
	pthread_mutex_unlock(&q->grow_lock);
	return next;
}

/*
 * True if position 'pos' of 'r' is free to write: the consumer has read
 * its previous lap. Reads the consumer's line only when the cached head
 * says the ring is (nearly) full.
 */
static bool slot_free(struct evq_ring *r, uint64_t pos)
{
	/* acquire: pairs with the release store below by another producer */
	uint64_t head = atomic_load_explicit(&r->head_seen,
					     memory_order_acquire);

	if (pos - head < r->size) {
		return true;
	}
	/* acquire: pairs with the consumer's release store of head */
	head = atomic_load_explicit(&r->head, memory_order_acquire);
	/* release: passes the consumer's reads on to other producers */
	atomic_store_explicit(&r->head_seen, head, memory_order_release);
	return pos - head < r->size;
}

int evq_push(struct evq *q, const struct evq_item *item)
{
	struct evq_ring *r = atomic_load_explicit(&q->cur,
						  memory_order_acquire);
	uint_fast64_t pos = atomic_load_explicit(&r->tail,
						 memory_order_acquire);

	for (;;) {
		struct evq_slot *s;
		int err;

		if (pos & EVQ_DEAD) {
			return ECANCELED;
		}
		if (pos & EVQ_SEALED) {
			r = atomic_load_explicit(&r->next,
						 memory_order_acquire);
			pos = atomic_load_explicit(&r->tail,
						   memory_order_acquire);
			continue;
		}
		if (!slot_free(r, pos)) {
			uint_fast64_t now = atomic_load_explicit(
				&r->tail, memory_order_acquire);

			if (now != pos) {
				/*
				 * A stale 'pos': the consumer may have read
				 * past it, and pos - head wrapped around.
				 * Judge the current tail instead.
				 */
				pos = now;
				continue;
			}
			/*
			 * Full for real: head was loaded while the tail was
			 * still pos, and head never passes the tail.
			 */
			if (q->bounded) {
				return EAGAIN;
			}
			r = grow(q, r, &err);
			if (r == NULL) {
				return err;
			}
			pos = atomic_load_explicit(&r->tail,
						   memory_order_acquire);
			continue;
		}
		/* acquire on failure: a sealed tail must show 'next' */
		if (!atomic_compare_exchange_weak_explicit(
			    &r->tail, &pos, pos + 1, memory_order_acquire,
			    memory_order_acquire)) {
			/* pos now holds the current tail */
			continue;
		}
		s = slot_at(r, pos);
		s->msg = item->msg;
		s->fn = item->fn;
		s->private_data = item->private_data;
		/* release: pairs with the consumer's acquire load of seq */
		atomic_store_explicit(&s->seq, PUBLISHED(pos),
				      memory_order_release);
		return 0;
	}
}

/* Consumer: move past rings that are sealed and drained. */
static struct evq_ring *consumer_ring(struct evq *q)
{
	struct evq_ring *r = q->first;

	for (;;) {
		uint_fast64_t tail;
		/*
		 * acquire: pairs with the release store of next in grow().
		 * A ring is sealed only after its next is linked, so while
		 * next is NULL the tail need not be read: an idle consumer
		 * polling here would otherwise pull the producers' tail line
		 * away from them on every poll, and the next claiming CAS
		 * would wait for it to come back.
		 */
		struct evq_ring *next = atomic_load_explicit(
			&r->next, memory_order_acquire);

		if (next == NULL) {
			return r;
		}
		tail = atomic_load_explicit(&r->tail, memory_order_acquire);
		if (!(tail & EVQ_SEALED) || r->pos < EVQ_POS(tail)) {
			return r;
		}
		q->first = next;
		r->retired_next = q->retired;
		q->retired = r;
		r = next;
	}
}

/*
 * seq_cst loads: they follow the consumer's barrier in the 'idle'
 * handshake (see proxy_internal.h); on x86 they cost what acquire loads
 * cost.
 */
bool evq_ready(struct evq *q)
{
	struct evq_ring *r = q->first;
	struct evq_slot *s = slot_at(r, r->pos);

	if (atomic_load_explicit(&s->seq, memory_order_seq_cst) ==
	    PUBLISHED(r->pos)) {
		return true;
	}
	r = consumer_ring(q);
	s = slot_at(r, r->pos);
	return atomic_load_explicit(&s->seq, memory_order_seq_cst) ==
	       PUBLISHED(r->pos);
}

bool evq_pop(struct evq *q, struct evq_item *item)
{
	struct evq_ring *r = q->first;
	uint64_t pos = r->pos;
	struct evq_slot *s = slot_at(r, pos);

	/* acquire: pairs with the producer's release store of seq */
	if (atomic_load_explicit(&s->seq, memory_order_acquire) !=
	    PUBLISHED(pos)) {
		r = consumer_ring(q);
		pos = r->pos;
		s = slot_at(r, pos);
		if (atomic_load_explicit(&s->seq, memory_order_acquire) !=
		    PUBLISHED(pos)) {
			return false;
		}
	}
	item->msg = s->msg;
	item->fn = s->fn;
	item->private_data = s->private_data;
	r->pos = ++pos;
	if (pos % EVQ_PUBLISH_EVERY == 0) {
		/* release: our reads of the slots come before their reuse */
		atomic_store_explicit(&r->head, pos, memory_order_release);
	}
	return true;
}

void evq_flush(struct evq *q)
{
	struct evq_ring *r = q->first;

	/* release: as in evq_pop */
	atomic_store_explicit(&r->head, r->pos, memory_order_release);
}

void evq_kill(struct evq *q)
{
	struct evq_ring *r;

	pthread_mutex_lock(&q->grow_lock);
	q->killed = true;
	/* the newest ring: 'cur' only moves under grow_lock */
	r = atomic_load_explicit(&q->cur, memory_order_relaxed);
	/*
	 * An RMW on the tail: ordered with every producer's claiming CAS.
	 * acq_rel: the claims before it are visible to the final drain.
	 */
	atomic_fetch_or_explicit(&r->tail, EVQ_DEAD, memory_order_acq_rel);
	pthread_mutex_unlock(&q->grow_lock);
}

bool evq_pop_final(struct evq *q, struct evq_item *item)
{
	for (;;) {
		struct evq_ring *r;
		uint_fast64_t tail;

		if (evq_pop(q, item)) {
			return true;
		}
		r = consumer_ring(q);
		tail = atomic_load_explicit(&r->tail, memory_order_acquire);
		if (!(tail & EVQ_SEALED) && r->pos == EVQ_POS(tail)) {
			/* the killed ring, every claimed slot taken */
			return false;
		}
		/* a producer is between its claim and its publish */
		sched_yield();
	}
}
