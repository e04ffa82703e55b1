#!/usr/bin/env python3
"""tevent's own test suites on evpoll.

Runs Samba's smbtorture (Debian package samba-testsuite) suites
local.event and local.tevent_req, which need no server:

1. once on the stock build (no preload): the tests that pass there are the
   ones evpoll must pass;
2. each of those tests on evpoll, one test per process with a timeout, in
   each mode (EVPOLL_MODE=never, auto, always): evpoll-preload.so makes
   evpoll tevent's default backend, and a test named for a stock backend
   (local.event.epoll.fd1) runs as its evpoll twin (local.event.evpoll.fd1);
3. all of them again in one process per mode.

A pass counts only if the test really ran on evpoll: the preload reports
how many contexts the process created and how many were evpoll; less what
smbtorture creates for itself (measured with a test name it does not know),
a test that created none on evpoll, or any elsewhere, fails, unless it is listed in NOT_ON_A_LOOP
(tests that never create a context, or that name another backend), which
still have to pass but are not counted.

Exit status: 0 when nothing failed, 1 otherwise, 77 when smbtorture is not
installed (the caller reports the suite as skipped).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

SUITES = ['local.event', 'local.tevent_req']
MODES = ['never', 'auto', 'always']
# backends tevent registers itself; their per-backend tests have an evpoll
# twin registered by the same suite once evpoll exists
STOCK_BACKEND_RE = re.compile(
    r'^local\.event\.(epoll|poll|poll_mt|standard)\.(.+)$')
# tests that cannot run on evpoll, and why (they must still pass)
NOT_ON_A_LOOP = {
    'local.event.threaded_poll_mt': 'asks for the "poll_mt" backend by name',
    'local.event.tevent_cached_getpid': 'creates no event context',
    'local.tevent_req.create': 'creates no event context',
    'local.tevent_req.profile1': 'creates no event context',
}
RESULT_RE = re.compile(r'^(success|failure|error|skip|xfail|todo): (\S+)')


def smbtorture_run(smbtorture, tests, env, timeout):
    """Run tests in one smbtorture process: (rc, {name: result}, output)."""
    argv = [smbtorture, '--fullname', 'ncalrpc:'] + tests
    try:
        p = subprocess.run(argv, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout,
                           universal_newlines=True, errors='replace')
        rc, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ''
        if isinstance(out, bytes):
            out = out.decode(errors='replace')
        rc, out = -1, out + '\n(timed out after %d s)\n' % timeout
    results = {}
    for line in out.splitlines():
        m = RESULT_RE.match(line)
        if m:
            results[m.group(2)] = m.group(1)
    return rc, results, out


def read_report(path):
    """Sum the preload's lines: (contexts, evpoll contexts)."""
    contexts = evpoll = 0
    try:
        with open(path) as f:
            for line in f:
                fields = dict(kv.split('=', 1) for kv in line.split())
                contexts += int(fields.get('contexts', 0))
                evpoll += int(fields.get('evpoll', 0))
    except IOError:
        pass
    return contexts, evpoll


def evpoll_twin(name):
    m = STOCK_BACKEND_RE.match(name)
    if m:
        return 'local.event.evpoll.' + m.group(2)
    return name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--preload', required=True,
                    help='path of evpoll-preload.so')
    ap.add_argument('--smbtorture', default='smbtorture')
    ap.add_argument('--timeout', type=int, default=120,
                    help='seconds per smbtorture process')
    ap.add_argument('--verbose', action='store_true')
    args = ap.parse_args()

    smbtorture = shutil.which(args.smbtorture)
    if smbtorture is None:
        print('tevent-suite: skipped: smbtorture not found (Debian '
              'package samba-testsuite)')
        return 77
    preload = os.path.abspath(args.preload)
    if not os.path.exists(preload):
        print('tevent-suite: %s not built' % preload)
        return 1

    base_env = dict(os.environ)
    for k in list(base_env):
        if k.startswith('EVPOLL_') or k == 'LD_PRELOAD':
            del base_env[k]

    rc, stock, out = smbtorture_run(smbtorture, SUITES, base_env,
                                    args.timeout * 4)
    stock_pass = sorted(t for t, r in stock.items() if r == 'success')
    if not stock_pass:
        print(out)
        print('tevent-suite: the stock run passed no test (rc %d)' % rc)
        return 1
    print('tevent-suite: stock run: %d tests passed, %d did not' %
          (len(stock_pass), len(stock) - len(stock_pass)))

    tests = []
    for t in stock_pass:
        twin = evpoll_twin(t)
        if twin not in tests:
            tests.append(twin)

    tmp = tempfile.mkdtemp(prefix='evpoll-tevent-suite.')
    passed = failed = 0
    table = {}
    failures = []

    runs = [0]

    def run(names, mode):
        runs[0] += 1
        report = os.path.join(tmp, 'report.%d' % runs[0])
        env = dict(base_env, EVPOLL_MODE=mode,
                   EVPOLL_PRELOAD_REPORT=report, LD_PRELOAD=preload)
        rc, res, out = smbtorture_run(smbtorture, names, env, args.timeout)
        contexts, evpoll = read_report(report)
        return rc, res, out, contexts, evpoll

    for mode in MODES:
        # what smbtorture creates itself before it runs anything
        _, _, _, own_contexts, own_evpoll = run(
            ['local.event.evpoll-suite-no-such-test'], mode)

        def run_counted(names):
            rc, res, out, contexts, evpoll = run(names, mode)
            return (rc, res, out, contexts - own_contexts,
                    evpoll - own_evpoll)

        for t in tests:
            rc, res, out, contexts, evpoll = run_counted([t])
            ok = rc == 0 and res.get(t) == 'success'
            why = '' if ok else 'result %s, exit %d' % (res.get(t), rc)
            if ok and t not in NOT_ON_A_LOOP and evpoll == 0:
                ok = False
                why = 'not routed: %d contexts, none on evpoll' % contexts
            if ok and contexts != evpoll and t not in NOT_ON_A_LOOP:
                ok = False
                why = 'only %d of %d contexts on evpoll' % (evpoll,
                                                            contexts)
            cell = 'pass' if ok else 'FAIL'
            if t in NOT_ON_A_LOOP:
                cell = 'pass*' if ok else 'FAIL*'
            if ok and t not in NOT_ON_A_LOOP:
                passed += 1
            elif not ok:
                failed += 1
                failures.append((t, mode, why, out))
            table[(t, mode)] = '%s %d/%d' % (cell, evpoll, contexts)
            if args.verbose:
                print('  %-45s %-6s %s %s' % (t, mode, cell, why))

        # all of them in one process
        label = 'one process'
        rc, res, out, contexts, evpoll = run_counted(tests)
        bad = [t for t in tests if res.get(t) != 'success']
        routed = [t for t in tests if t not in NOT_ON_A_LOOP]
        ok = rc == 0 and not bad and evpoll >= len(routed)
        why = ''
        if not ok:
            why = 'exit %d, not passed: %s, %d/%d contexts on evpoll' % (
                rc, ' '.join(bad) or '-', evpoll, contexts)
            failures.append((label, mode, why, out))
            failed += 1
        else:
            passed += 1
        table[(label, mode)] = '%s %d/%d' % ('pass' if ok else 'FAIL',
                                             evpoll, contexts)

    width = max(len(t) for t in tests + ['one process'])
    print('contexts each test created: on evpoll / in all (less what '
          'smbtorture creates itself)')
    print('%-*s  %s' % (width, 'test',
                        '  '.join('%-12s' % m for m in MODES)))
    for t in tests + ['one process']:
        print('%-*s  %s' % (width, t, '  '.join(
            '%-12s' % table[(t, m)] for m in MODES)))
    for t, why in sorted(NOT_ON_A_LOOP.items()):
        if t in tests:
            print('* %s: not counted, %s' % (t, why))
    for t, mode, why, out in failures:
        print('--- FAILED: %s (EVPOLL_MODE=%s): %s' % (t, mode, why))
        print('\n'.join(out.splitlines()[-30:]))
    shutil.rmtree(tmp, ignore_errors=True)
    print('tevent-suite: %d passed, %d failed' % (passed, failed))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
