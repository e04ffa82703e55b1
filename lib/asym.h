/*
 * Asymmetric store-load barriers for the handshakes where one side runs
 * often (a sender, per message; the kernel posting completions) and the
 * other rarely (a consumer about to sleep, a sender about to wait).
 *
 * Compiled into both libraries (each keeps a hidden copy; the membarrier
 * registration is per process and idempotent).
 *
 * The pattern is Dekker's: the fast side stores A then loads B, the slow
 * side stores B then loads A, and at least one of them must see the other's
 * store. Normally both sides need a full fence (an xchg or mfence on x86,
 * which waits for the store buffer to drain: a cache miss per message when
 * the store went to a line the consumer reads). With membarrier(2)
 * PRIVATE_EXPEDITED the slow side forces a full barrier on every running
 * thread of the process, so the fast side needs only a compiler barrier:
 * a thread that was not running passed a context switch, which is a full
 * barrier too.
 *
 *   fast side:  store A; asym_light_barrier(); load B
 *   slow side:  store B; asym_heavy_barrier(); load A
 *
 * Where membarrier is missing (old kernels, seccomp filters, valgrind
 * versions that do not know it) both sides fall back to seq_cst fences,
 * which is the same guarantee at the fast side's old price. The choice is
 * made once per process, before the first handshake starts.
 */
#ifndef EV_ASYM_H
#define EV_ASYM_H

#include <stdatomic.h>
#include <stdbool.h>

/*
 * A full fence. ThreadSanitizer does not support atomic_thread_fence; there
 * a seq_cst read-modify-write of one process-wide word stands in for it
 * (a full barrier on x86, and all seq_cst RMWs of the process are ordered).
 */
#if defined(__SANITIZE_THREAD__)
extern atomic_uint asym_fence_word;
#define asym_full_fence() \
	((void)atomic_fetch_add_explicit(&asym_fence_word, 0, \
					 memory_order_seq_cst))
#else
#define asym_full_fence() atomic_thread_fence(memory_order_seq_cst)
#endif

/* True if membarrier is in use; call before the first barrier (idempotent). */
bool asym_init(void);

/* The fast side; 'asym' is what asym_init() returned. */
static inline void asym_light_barrier(bool asym)
{
	if (asym) {
		atomic_signal_fence(memory_order_seq_cst);
	} else {
		asym_full_fence();
	}
}

/* The slow side: a system call when 'asym'. */
void asym_heavy_barrier(bool asym);

#endif
