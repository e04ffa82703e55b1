/*
 * evpoll-preload.so: loaded with LD_PRELOAD into an unmodified tevent
 * program, it registers the evpoll backend and makes it tevent's default,
 * so that tevent_context_init() returns evpoll contexts. Contexts asked
 * for by name ("epoll", "poll", ...) are left alone.
 *
 * With EVPOLL_PRELOAD_REPORT=FILE set, each process that created a
 * context appends one line to FILE when it exits:
 *	pid=P contexts=N evpoll=M
 * counting the contexts tevent returned to the program and how many of
 * them are evpoll contexts (asked with evpoll_is_evpoll()). Test runners
 * use it to prove that a test ran on evpoll.
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <tevent.h>

#include "evpoll.h"

#define EXPORT __attribute__((visibility("default")))

static atomic_uint n_contexts;	/* counters only: relaxed */
static atomic_uint n_evpoll;
/*
 * The process the counters belong to: a fork child starts from zero (set
 * by the first thread that counts in it; a child has one thread at first).
 */
static atomic_int count_pid;
/* each thread counts only its outermost creation call */
static __thread unsigned depth;

static void *next_sym(const char *name)
{
	void *fn = dlsym(RTLD_NEXT, name);

	if (fn == NULL) {
		fprintf(stderr, "evpoll-preload: %s not found: %s\n", name,
			dlerror());
		abort();
	}
	return fn;
}

static struct tevent_context *(*real_init)(TALLOC_CTX *);
static struct tevent_context *(*real_init_byname)(TALLOC_CTX *,
						  const char *);
static struct tevent_context *(*real_init_ops)(TALLOC_CTX *,
					       const struct tevent_ops *,
					       void *);

/*
 * Run by the constructor, before the program's threads exist; a call that
 * comes earlier (another library's constructor) resolves on its own.
 */
static void resolve(void)
{
	if (real_init_ops == NULL) {
		real_init = next_sym("tevent_context_init");
		real_init_byname = next_sym("tevent_context_init_byname");
		real_init_ops = next_sym("tevent_context_init_ops");
	}
}

static struct tevent_context *counted(struct tevent_context *ev)
{
	if (ev != NULL && depth == 0) {
		int old = atomic_load_explicit(&count_pid,
					       memory_order_relaxed);
		int me = (int)getpid();

		/* relaxed: one thread of a new process wins and resets */
		if (old != me &&
		    atomic_compare_exchange_strong_explicit(
			    &count_pid, &old, me, memory_order_relaxed,
			    memory_order_relaxed)) {
			atomic_store_explicit(&n_contexts, 0,
					      memory_order_relaxed);
			atomic_store_explicit(&n_evpoll, 0,
					      memory_order_relaxed);
		}
		atomic_fetch_add_explicit(&n_contexts, 1,
					  memory_order_relaxed);
		if (evpoll_is_evpoll(ev)) {
			atomic_fetch_add_explicit(&n_evpoll, 1,
						  memory_order_relaxed);
		}
	}
	return ev;
}

EXPORT struct tevent_context *tevent_context_init(TALLOC_CTX *mem_ctx)
{
	struct tevent_context *ev;

	resolve();
	depth++;
	ev = real_init(mem_ctx);
	depth--;
	return counted(ev);
}

EXPORT struct tevent_context *tevent_context_init_byname(TALLOC_CTX *mem_ctx,
							 const char *name)
{
	struct tevent_context *ev;

	resolve();
	depth++;
	ev = real_init_byname(mem_ctx, name);
	depth--;
	return counted(ev);
}

EXPORT struct tevent_context *tevent_context_init_ops(
	TALLOC_CTX *mem_ctx, const struct tevent_ops *ops,
	void *additional_data)
{
	struct tevent_context *ev;

	resolve();
	depth++;
	ev = real_init_ops(mem_ctx, ops, additional_data);
	depth--;
	return counted(ev);
}

__attribute__((constructor)) static void preload_init(void)
{
	resolve();
	if (!evpoll_init()) {
		fprintf(stderr, "evpoll-preload: evpoll_init() failed\n");
		return;
	}
	tevent_set_default_backend("evpoll");
}

__attribute__((destructor)) static void preload_report(void)
{
	const char *path = getenv("EVPOLL_PRELOAD_REPORT");
	unsigned n = atomic_load_explicit(&n_contexts, memory_order_relaxed);
	char line[96];
	int fd, len;

	if (path == NULL || *path == '\0' || n == 0 ||
	    atomic_load_explicit(&count_pid, memory_order_relaxed) !=
		    (int)getpid()) {
		return;
	}
	len = snprintf(line, sizeof(line), "pid=%d contexts=%u evpoll=%u\n",
		       (int)getpid(), n,
		       atomic_load_explicit(&n_evpoll, memory_order_relaxed));
	fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (fd == -1) {
		return;
	}
	/* one write with O_APPEND: lines of several processes do not mix */
	if (write(fd, line, (size_t)len) != len) {
		/* nothing to do: the runner sees a missing line */
	}
	close(fd);
}
