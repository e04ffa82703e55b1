/*
 * Asymmetric barriers, see asym.h.
 */
#include <linux/membarrier.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "asym.h"

#if defined(__SANITIZE_THREAD__)
atomic_uint asym_fence_word;
#endif

static pthread_once_t asym_once = PTHREAD_ONCE_INIT;
/* written once under asym_once; pthread_once orders it for every caller */
static bool asym_ok;

static int membarrier(int cmd)
{
	return (int)syscall(__NR_membarrier, cmd, 0, 0);
}

static void asym_setup(void)
{
	int cmds;

	if (getenv("EVPROXY_NO_MEMBARRIER") != NULL) {
		/* lets the tests run the fallback too */
		return;
	}
	cmds = membarrier(MEMBARRIER_CMD_QUERY);
	if (cmds < 0 || !(cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED)) {
		return;
	}
	if (membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) != 0) {
		return;
	}
	asym_ok = true;
}

bool asym_init(void)
{
	pthread_once(&asym_once, asym_setup);
	return asym_ok;
}

void asym_heavy_barrier(bool asym)
{
	/* the fences make the caller's own order plain in C11 terms */
	asym_full_fence();
	if (asym && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0) {
		/*
		 * Registered but refused: cannot happen short of a kernel
		 * bug. Senders only use compiler barriers, so there is no
		 * safe way on.
		 */
		abort();
	}
	asym_full_fence();
}
