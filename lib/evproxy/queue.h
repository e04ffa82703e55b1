/*
 * evq: the multi-producer, single-consumer message queue behind evproxy.
 *
 * A ring of slots. A producer claims position 'pos' with a CAS on the
 * ring's tail, writes the slot, then publishes it by storing pos + 1 into
 * the slot's sequence word (release); the consumer takes the slot at its
 * position when the word says so (acquire). The consumer never writes a
 * slot: it publishes how far it has read in the ring's 'head' (release),
 * every EVQ_PUBLISH_EVERY items and whenever a drain ends (evq_flush), and
 * a producer claims 'pos' only while pos < head + size (head loaded with
 * acquire), so a slot is rewritten only after its last reading. The lines
 * that move between the threads are the slot lines, one way, and 'head'
 * once per batch; producers cache the head they saw next to the tail so a
 * queue that is not nearly full costs them no read of the consumer's line.
 *
 * Bounded queues are one ring of exactly 'capacity' slots: a full ring
 * gives EAGAIN (items the consumer took but has not published yet still
 * count, until its drain ends). Unbounded queues are a chain of rings, each
 * twice the size of the one before: a producer that finds the ring full
 * links a new ring (under a mutex, the only lock, taken once per growth)
 * and then SEALS the old one by setting the top bit of its tail, which
 * makes every later CAS on it fail. So a producer never goes back to an
 * older ring and each producer's messages stay in order. The consumer
 * moves to the next ring when the old one is sealed and drained to its
 * final tail. Retired rings are freed with the queue, since a slow
 * producer may still be reading one; with doubling they add up to less
 * than the newest ring.
 *
 * Killing the queue (the destination is going away) sets another top bit,
 * DEAD, on the newest ring's tail under the growth mutex, so no position
 * can be claimed any more: a producer's CAS either came first, and then
 * its position is below the final tail and the slot will be published
 * (nothing blocks between claim and publish), or it fails and the producer
 * sees DEAD and returns ECANCELED. The tail is the one point both sides
 * serialise on, so teardown is exact without a per-send counter.
 *
 * Publishing is a release store; a caller that needs a store-load order
 * after it (the idle handshake in proxy_internal.h) adds its own barrier.
 */
#ifndef EVPROXY_QUEUE_H
#define EVPROXY_QUEUE_H

#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct evq_slot {
	atomic_uint_fast64_t seq;	/* pos + 1 once pos is published */
	void *msg;
	void *fn;
	void *private_data;
};

struct evq_ring {
	/* set (release) before the ring is sealed; read (acquire) after */
	_Atomic(struct evq_ring *) next;
	struct evq_ring *retired_next;	/* consumer only */
	uint64_t size;
	uint64_t mask;			/* size - 1 when size is a power of 2 */
	/* producers: next position to claim, top bits = sealed, dead */
	alignas(64) atomic_uint_fast64_t tail;
	/*
	 * producers: a value of 'head' one of them loaded (acquire) and
	 * stored here (release), so another producer that loads it (acquire)
	 * also sees the consumer's reads of the slots below it finished
	 */
	atomic_uint_fast64_t head_seen;
	/* consumer: stores (release) how far it has read; producers load */
	alignas(64) atomic_uint_fast64_t head;
	/* consumer only: the next position to read */
	alignas(64) uint64_t pos;
	alignas(64) struct evq_slot slots[];
};

struct evq {
	/*
	 * The ring producers start from: stored (release) after a new ring
	 * was linked, loaded (acquire) by producers. Only moves forward.
	 */
	alignas(64) _Atomic(struct evq_ring *) cur;
	bool bounded;
	pthread_mutex_t grow_lock;
	bool killed;			/* under grow_lock */
	struct evq_ring *first;		/* consumer: the ring it reads */
	struct evq_ring *retired;	/* consumer: drained rings */
};

struct evq_item {
	void *msg;
	void *fn;
	void *private_data;
};

/* capacity 0: unbounded. Returns 0 or ENOMEM. */
int evq_init(struct evq *q, uint64_t capacity);
/* Frees the rings; items still queued are the caller's to drain first. */
void evq_destroy(struct evq *q);
/*
 * Any thread. 0, EAGAIN (bounded and full), ECANCELED (killed) or ENOMEM
 * (cannot grow).
 */
int evq_push(struct evq *q, const struct evq_item *item);
/* Consumer only. True if an item was taken. */
bool evq_pop(struct evq *q, struct evq_item *item);
/* Consumer only: give the slots taken so far back to the producers. */
void evq_flush(struct evq *q);
/* Consumer only. True if the next item is published. */
bool evq_ready(struct evq *q);
/* Consumer only, once: later pushes fail with ECANCELED. */
void evq_kill(struct evq *q);
/*
 * Consumer only, after evq_kill: take the next item, waiting for a
 * producer that claimed a slot but has not published it yet. False when
 * every claimed slot was taken.
 */
bool evq_pop_final(struct evq *q, struct evq_item *item);

#endif
