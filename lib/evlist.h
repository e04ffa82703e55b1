/*
 * Minimal intrusive doubly linked list with head and tail, for structures
 * that carry 'prev' and 'next' members. Appends keep insertion order.
 */
#ifndef EVPROXY_EVLIST_H
#define EVPROXY_EVLIST_H

#define EVLIST_APPEND(head, tail, item) do {				\
	(item)->next = NULL;						\
	(item)->prev = (tail);						\
	if ((tail) != NULL) {						\
		(tail)->next = (item);					\
	} else {							\
		(head) = (item);					\
	}								\
	(tail) = (item);						\
} while (0)

#define EVLIST_REMOVE(head, tail, item) do {				\
	if ((item)->prev != NULL) {					\
		(item)->prev->next = (item)->next;			\
	} else {							\
		(head) = (item)->next;					\
	}								\
	if ((item)->next != NULL) {					\
		(item)->next->prev = (item)->prev;			\
	} else {							\
		(tail) = (item)->prev;					\
	}								\
	(item)->prev = NULL;						\
	(item)->next = NULL;						\
} while (0)

#endif
