/*
 * evpoll_rdma: RDMA completion queues on a tevent loop.
 *
 * Copyright (C) 2026 The evproxy authors
 *
 * This library is free software; you can redistribute it and/or modify it
 * under the terms of the GNU Lesser General Public License as published by
 * the Free Software Foundation; either version 3 of the License, or (at
 * your option) any later version.  See COPYING.
 */

#ifndef EVPOLL_RDMA_H
#define EVPOLL_RDMA_H

#include <infiniband/verbs.h>
#include <talloc.h>
#include <tevent.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * @defgroup evpoll_rdma RDMA completion queues
 *
 * Delivers the work completions of an ibv_cq to a handler on a tevent
 * loop. While the loop sleeps, completions arrive through the CQ's
 * completion channel: its fd is watched by a tevent_fd, each CQ event is
 * read with ibv_get_cq_event(), the CQ is drained, re-armed with
 * ibv_req_notify_cq() and polled once more. While an evpoll loop spins,
 * a poll callback calls ibv_poll_cq() on every pass and the CQ is left
 * unarmed (no interrupts, no events); when the spin ends the exit callback
 * re-arms the CQ and polls it once more before the loop may sleep.
 *
 * Every completion is delivered exactly once: completions are taken only
 * from ibv_poll_cq(), which hands out each entry once, and the CQ is
 * polled after every arming, so a completion that landed before the arm
 * took effect (and so raised no event) is found by that poll, and one that
 * landed after it raises an event that wakes the loop.
 *
 * Works on every tevent backend; on a backend other than evpoll (and in
 * EVPOLL_MODE_NEVER) only the completion channel path is used.
 *
 * Rules for the caller:
 * - the completion channel serves this CQ only (an event of another CQ is
 *   acknowledged, reported through tevent's debug hook and dropped);
 * - one adapter per CQ; do not poll, arm or read events of the CQ or the
 *   channel elsewhere while the adapter is attached;
 * - the CQ and the channel stay the caller's: detach (talloc_free()) the
 *   adapter before ibv_destroy_cq() and ibv_destroy_comp_channel(). The
 *   adapter acknowledges every CQ event it read before detaching, so
 *   ibv_destroy_cq() does not wait.
 *
 * Thread safety: a tevent context belongs to one thread (its owner).
 * evpoll_rdma_cq_attach() and the talloc_free() of its result must be
 * called on the owner thread of @p ev; the handler runs there too. The
 * provider may add completions to the CQ from any thread or from the
 * hardware, as usual.
 *
 * @{
 */

/**
 * Completion events read from the channel are acknowledged with
 * ibv_ack_cq_events() in batches of this many (acknowledging takes a
 * mutex); the rest are acknowledged when the adapter is detached.
 */
#define EVPOLL_RDMA_ACK_BATCH 16

/**
 * At most this many work completions are passed to one handler call
 * (the size of the array given to ibv_poll_cq()).
 */
#define EVPOLL_RDMA_WC_BATCH 16

/**
 * At most this many work completions are delivered per dispatch (one fd
 * handler, poll callback or immediate) before the adapter lets the loop
 * run other events; the rest follow at the next iteration.
 */
#define EVPOLL_RDMA_BUDGET 64

/**
 * Work completion handler, run on the owner loop.
 *
 * @param ev		the tevent context
 * @param wc		@p n work completions, in CQ order, as returned by
 *			ibv_poll_cq(): check wc[i].status. Valid only during
 *			the call.
 * @param n		1 .. EVPOLL_RDMA_WC_BATCH
 * @param private_data	as given to evpoll_rdma_cq_attach()
 *
 * The handler may talloc_free() the adapter: no further completion is
 * delivered from then on, and the completions still in the CQ stay there.
 * The handler may run a nested event loop; later completions may then be
 * delivered (in CQ order) by the nested loop before the handler returns.
 */
typedef void (*evpoll_wc_fn)(struct tevent_context *ev, struct ibv_wc *wc,
			     int n, void *private_data);

struct evpoll_rdma_cq;

/**
 * Deliver the completions of @p cq on @p ev. Owner thread.
 *
 * The channel's fd is made non-blocking (its file status flags are
 * restored on detach). The CQ is armed for notification of every
 * completion (solicited_only 0) unless the loop is spinning, and a first
 * poll of the CQ runs at the loop's next iteration, which delivers the
 * completions queued before the attach. The handler is never called from
 * inside this function.
 *
 * Detach with talloc_free() (also from inside the handler). Detaching
 * acknowledges all events read, restores the fd's flags and leaves the CQ
 * and the channel to the caller, possibly armed, possibly with an unread
 * event on the channel. If the tevent context is freed first, the adapter
 * becomes inert; free it afterwards as usual.
 *
 * @param ev		any tevent context
 * @param mem_ctx	talloc parent of the adapter
 * @param cq		the completion queue, created with @p channel
 * @param channel	its completion channel (cq->channel)
 * @param handler	called with batches of work completions
 * @param private_data	passed to @p handler
 * @return the adapter, or NULL with errno set: EINVAL (NULL @p ev, @p cq,
 *         @p channel or @p handler, or @p channel is not cq->channel),
 *         ENOMEM, the error of fcntl() on the channel's fd, or the error of
 *         ibv_req_notify_cq().
 */
struct evpoll_rdma_cq *evpoll_rdma_cq_attach(struct tevent_context *ev,
					     TALLOC_CTX *mem_ctx,
					     struct ibv_cq *cq,
					     struct ibv_comp_channel *channel,
					     evpoll_wc_fn handler,
					     void *private_data);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* EVPOLL_RDMA_H */
