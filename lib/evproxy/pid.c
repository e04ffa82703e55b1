/*
 * The cached pid, see pid.h.
 *
 * Written by the pthread_atfork child handler, which runs while the child
 * is still single-threaded, and by the one-time init; relaxed loads are
 * enough.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "pid.h"

static atomic_int cached_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void pid_reset(void)
{
	atomic_store_explicit(&cached_pid, (int)getpid(),
			      memory_order_relaxed);
}

static void pid_setup(void)
{
	pid_reset();
	pthread_atfork(NULL, NULL, pid_reset);
}

void evproxy_pid_init(void)
{
	pthread_once(&pid_once, pid_setup);
}

pid_t evproxy_pid(void)
{
	return (pid_t)atomic_load_explicit(&cached_pid, memory_order_relaxed);
}
