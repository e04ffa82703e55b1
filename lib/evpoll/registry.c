/*
 * Map a tevent context to its evpoll state.
 *
 * tevent's context is opaque and the epoll backend owns its
 * additional_data, so evpoll keeps its own map. Lookups happen on every loop
 * iteration; each thread caches its last answer, validated by a generation
 * number that every removal bumps.
 */
#include <errno.h>
#include <pthread.h>

#include "evpoll_internal.h"

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct evpoll_state *registry;	/* under registry_lock */

/*
 * Bumped (release, under the lock) after a state leaves the registry; a
 * cached lookup is trusted only while the generation it was made under is
 * still current (acquire load), so a freed context whose address is reused
 * can never hit a stale cache entry.
 */
static atomic_uint_fast64_t registry_gen = 1;

static __thread struct {
	struct tevent_context *ev;
	struct evpoll_state *st;
	uint_fast64_t gen;
} cache;

int evpoll_registry_add(struct evpoll_state *st)
{
	pthread_mutex_lock(&registry_lock);
	st->reg_next = registry;
	registry = st;
	pthread_mutex_unlock(&registry_lock);
	return 0;
}

void evpoll_registry_remove(struct evpoll_state *st)
{
	struct evpoll_state **pp;

	pthread_mutex_lock(&registry_lock);
	for (pp = &registry; *pp != NULL; pp = &(*pp)->reg_next) {
		if (*pp == st) {
			*pp = st->reg_next;
			break;
		}
	}
	atomic_fetch_add_explicit(&registry_gen, 1, memory_order_release);
	pthread_mutex_unlock(&registry_lock);
}

struct evpoll_state *evpoll_state_get(struct tevent_context *ev)
{
	struct evpoll_state *st;
	uint_fast64_t gen;

	if (ev == NULL) {
		return NULL;
	}
	gen = atomic_load_explicit(&registry_gen, memory_order_acquire);
	if (cache.ev == ev && cache.gen == gen) {
		return cache.st;
	}

	pthread_mutex_lock(&registry_lock);
	gen = atomic_load_explicit(&registry_gen, memory_order_relaxed);
	for (st = registry; st != NULL; st = st->reg_next) {
		if (st->ev == ev) {
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);

	if (st != NULL) {
		cache.ev = ev;
		cache.st = st;
		cache.gen = gen;
	}
	return st;
}
