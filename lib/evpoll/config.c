/*
 * evpoll configuration: defaults, operator overrides from the environment,
 * validation.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "evpoll_internal.h"

/* Strict decimal parse: digits only, no sign, no overflow, no trailer. */
static bool parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;

	if (s == NULL || *s == '\0') {
		return false;
	}
	for (; *s != '\0'; s++) {
		unsigned d;

		if (*s < '0' || *s > '9') {
			return false;
		}
		d = (unsigned)(*s - '0');
		if (v > (max - d) / 10) {
			return false;
		}
		v = v * 10 + d;
	}
	*out = v;
	return true;
}

/* Append a line about a bad value to *report, when asked to. */
static void bad_env(TALLOC_CTX *mem_ctx, char **report, const char *name,
		    const char *value)
{
	if (report == NULL) {
		return;
	}
	if (*report == NULL) {
		*report = talloc_strdup(mem_ctx, "");
	}
	if (*report != NULL) {
		*report = talloc_asprintf_append(
			*report, "evpoll: ignoring invalid %s=\"%s\"\n", name,
			value);
	}
}

void evpoll_config_load(struct evpoll_config *cfg, TALLOC_CTX *mem_ctx,
			char **report)
{
	const char *s;
	uint64_t v;

	cfg->mode = EVPOLL_MODE_AUTO;
	cfg->spin_ns = EVPOLL_DEFAULT_SPIN_NS;
	cfg->poll_iterations = EVPOLL_DEFAULT_POLL_ITERATIONS;

	s = getenv("EVPOLL_MODE");
	if (s != NULL) {
		if (strcmp(s, "never") == 0) {
			cfg->mode = EVPOLL_MODE_NEVER;
		} else if (strcmp(s, "auto") == 0) {
			cfg->mode = EVPOLL_MODE_AUTO;
		} else if (strcmp(s, "always") == 0) {
			cfg->mode = EVPOLL_MODE_ALWAYS;
		} else {
			bad_env(mem_ctx, report, "EVPOLL_MODE", s);
		}
	}
	s = getenv("EVPOLL_SPIN_NS");
	if (s != NULL) {
		if (parse_u64(s, UINT64_MAX, &v)) {
			cfg->spin_ns = v;
		} else {
			bad_env(mem_ctx, report, "EVPOLL_SPIN_NS", s);
		}
	}
	s = getenv("EVPOLL_POLL_ITERATIONS");
	if (s != NULL) {
		if (parse_u64(s, UINT32_MAX, &v) && v > 0) {
			cfg->poll_iterations = (unsigned)v;
		} else {
			bad_env(mem_ctx, report, "EVPOLL_POLL_ITERATIONS", s);
		}
	}
}

bool evpoll_config_valid(const struct evpoll_config *cfg)
{
	if (cfg == NULL) {
		return false;
	}
	if (cfg->mode != EVPOLL_MODE_NEVER && cfg->mode != EVPOLL_MODE_AUTO &&
	    cfg->mode != EVPOLL_MODE_ALWAYS) {
		return false;
	}
	return cfg->poll_iterations > 0;
}

_PUBLIC_ void evpoll_config_default(struct evpoll_config *cfg)
{
	if (cfg == NULL) {
		return;
	}
	evpoll_config_load(cfg, NULL, NULL);
}

_PUBLIC_ int evpoll_set_config(struct tevent_context *ev,
			       const struct evpoll_config *cfg)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st == NULL || !evpoll_config_valid(cfg)) {
		return EINVAL;
	}
	st->cfg = *cfg;
	if (cfg->mode == EVPOLL_MODE_NEVER && st->spinning) {
		evpoll_spin_exit(st, evpoll_now_ns());
	}
	return 0;
}

_PUBLIC_ int evpoll_get_config(struct tevent_context *ev,
			       struct evpoll_config *cfg)
{
	struct evpoll_state *st = evpoll_state_get(ev);

	if (st == NULL || cfg == NULL) {
		return EINVAL;
	}
	*cfg = st->cfg;
	return 0;
}
