/*
 * The pid of this process, cached and reset in fork children, so that
 * objects inherited across fork() can tell they are dead here without a
 * getpid() syscall per operation. Async-signal-safe.
 */
#ifndef EVPROXY_PID_H
#define EVPROXY_PID_H

#include <sys/types.h>

/* Call once before using evproxy_pid() (creation paths do). */
void evproxy_pid_init(void);
pid_t evproxy_pid(void);

#endif
