#!/usr/bin/env python3
# evproxy: waf build, Samba standalone-library style.
# Run through ./buildtools/bin/waf, or the Makefile / ./configure wrappers.

import os
import subprocess
import sys

from waflib import Build, Context, Errors, Logs, Options, Utils

APPNAME = 'evproxy'
VERSION = '0.1.0'
top = '.'
out = 'bin'

# name -> (source folder, libraries it uses)
LIBRARIES = [
    ('evpoll', 'lib/evpoll', ['TEVENT', 'TALLOC', 'PTHREAD']),
    ('evproxy', 'lib/evproxy', ['evpoll', 'TEVENT', 'TALLOC', 'PTHREAD']),
]

LIBRARY_NAMES = [name for name, _, _ in LIBRARIES]

PUBLIC_HEADERS = ['include/evpoll.h', 'include/evproxy.h',
                  'include/evproxy_pool.h']

# Optional adapters: (env flag, file prefix in lib/evpoll and tests/,
# public header, uselib, exported symbol prefix)
ADAPTERS = [
    ('HAVE_URING', 'uring', 'include/evpoll_uring.h', 'URING',
     'evpoll_uring_'),
    ('HAVE_RDMA', 'rdma', 'include/evpoll_rdma.h', 'IBVERBS',
     'evpoll_rdma_'),
]


def _wanted(env, node):
    """False for sources and tests of an adapter that is left out."""
    name = node.name
    if name.startswith('test_'):
        name = name[len('test_'):]
    for flag, pfx, _, _, _ in ADAPTERS:
        if name.startswith(pfx) and not env[flag]:
            return False
    return True

DEVELOPER_CFLAGS = [
    '-g', '-Werror', '-Wall', '-Wextra', '-Wshadow', '-Wpointer-arith',
    '-Wcast-align', '-Wwrite-strings', '-Wmissing-prototypes',
    '-Wstrict-prototypes', '-Wold-style-definition', '-Wformat=2',
    '-Wno-unused-parameter', '-Wno-missing-field-initializers',
]


def options(opt):
    opt.load('compiler_c')
    grp = opt.add_option_group('evproxy options')
    grp.add_option('--enable-developer', action='store_true',
                   default=False, dest='developer',
                   help='-Werror, -g and extra warnings')
    grp.add_option('--without-liburing', action='store_true', default=False,
                   dest='without_liburing',
                   help='leave out the io_uring adapter (evpoll_uring.h)')
    grp.add_option('--without-rdma', action='store_true', default=False,
                   dest='without_rdma',
                   help='leave out the RDMA adapter (evpoll_rdma.h)')
    grp.add_option('--with-sanitizer', action='store', default='',
                   dest='sanitizer',
                   help='build with sanitizers: "address,undefined" or '
                        '"thread" (use a separate output folder, see '
                        'the Makefile targets test-asan and test-tsan)')


def configure(conf):
    conf.load('compiler_c')
    conf.env.VERSION = VERSION

    conf.check_cfg(package='tevent', atleast_version='0.14',
                   args=['--cflags', '--libs'], uselib_store='TEVENT',
                   msg='Checking for tevent >= 0.14')
    conf.check_cfg(package='talloc', atleast_version='2.4',
                   args=['--cflags', '--libs'], uselib_store='TALLOC',
                   msg='Checking for talloc >= 2.4')
    conf.check_cfg(package='cmocka', atleast_version='1.1',
                   args=['--cflags', '--libs'], uselib_store='CMOCKA',
                   msg='Checking for cmocka >= 1.1')
    # optional completion-source adapters
    conf.env.HAVE_URING = False
    if Options.options.without_liburing:
        Logs.pprint('YELLOW', 'io_uring adapter: left out (--without-liburing)')
    elif conf.check_cfg(package='liburing', atleast_version='2.3',
                        args=['--cflags', '--libs'], uselib_store='URING',
                        msg='Checking for liburing >= 2.3', mandatory=False):
        conf.env.HAVE_URING = True
    else:
        Logs.pprint('YELLOW', 'io_uring adapter: left out (liburing >= 2.3 '
                    'not found; install liburing-dev)')
    conf.env.HAVE_RDMA = False
    if Options.options.without_rdma:
        Logs.pprint('YELLOW', 'RDMA adapter: left out (--without-rdma)')
    elif conf.check_cfg(package='libibverbs', args=['--cflags', '--libs'],
                        uselib_store='IBVERBS', msg='Checking for libibverbs',
                        mandatory=False):
        conf.env.HAVE_RDMA = True
    else:
        Logs.pprint('YELLOW', 'RDMA adapter: left out (libibverbs not '
                    'found; install libibverbs-dev)')

    conf.check_cc(lib='pthread', uselib_store='PTHREAD',
                  msg='Checking for pthread')
    conf.env.append_value('LINKFLAGS_PTHREAD', ['-pthread'])
    conf.env.append_value('CFLAGS_PTHREAD', ['-pthread'])

    # libtevent exports these (versioned, ABI-tracked) without declaring
    # them in tevent.h; lib/evpoll declares them itself.
    for fn in ['tevent_common_loop_immediate', 'tevent_common_have_events',
               'tevent_common_loop_timer_delay', 'tevent_common_check_signal',
               'tevent_common_threaded_activate_immediate',
               'tevent_common_context_destructor',
               'tevent_debug', 'tevent_trace_point_callback',
               'tevent_trace_fd_callback', 'tevent_trace_timer_callback',
               'tevent_trace_signal_callback',
               'tevent_trace_immediate_callback']:
        conf.check_cc(fragment='''
            #include <stdbool.h>
            #include <tevent.h>
            extern void %s(void);
            int main(void) { void (*f)(void) = %s; return f == 0; }
        ''' % (fn, fn), use='TEVENT TALLOC',
            msg='Checking libtevent exports %s' % fn)

    conf.env.append_value('CFLAGS', ['-std=gnu11', '-D_GNU_SOURCE',
                                     '-fvisibility=hidden', '-O2'])
    if Options.options.developer:
        conf.env.append_value('CFLAGS', DEVELOPER_CFLAGS)
        conf.env.DEVELOPER = True

    san = Options.options.sanitizer
    conf.env.SANITIZER = san
    if san:
        allowed = ['address,undefined', 'thread']
        if san not in allowed:
            conf.fatal('--with-sanitizer must be one of %s' % allowed)
        flags = ['-fsanitize=' + san, '-fno-omit-frame-pointer', '-g']
        if 'undefined' in san:
            flags.append('-fno-sanitize-recover=undefined')
        conf.env.append_value('CFLAGS', flags)
        conf.env.append_value('LINKFLAGS', ['-fsanitize=' + san])
        conf.check_cc(fragment='int main(void) { return 0; }',
                      execute=True, msg='Checking that %s sanitizer runs' % san)

    conf.find_program('nm', var='NM')
    conf.env.TEVENT_VERSION = conf.cmd_and_log(
        ['pkg-config', '--modversion', 'tevent']).strip()


def _version_script(bld, name):
    """Export only <name>_* symbols, under a version node."""
    node = bld.path.find_or_declare('%s.vscript' % name)
    node.write('%s_%s {\n\tglobal:\n\t\t%s_*;\n\tlocal:\n\t\t*;\n};\n'
               % (name.upper(), VERSION, name))
    return node


def build(bld):
    bld.env.TESTS = []
    bld.env.EXAMPLES = []
    for name, folder, uses in LIBRARIES:
        vscript = _version_script(bld, name)
        extra = [u for flag, _, _, u, _ in ADAPTERS
                 if name == 'evpoll' and bld.env[flag]]
        ours = [u for u in uses if u in LIBRARY_NAMES]
        external = [u for u in uses if u not in LIBRARY_NAMES] + extra
        # lib/*.c: small internal helpers, a hidden copy in each library
        bld.objects(source=[n for n in bld.path.ant_glob(folder + '/*.c')
                            if _wanted(bld.env, n)] +
                    bld.path.ant_glob('lib/*.c'),
                    target=name + '_objs',
                    includes=['include', 'lib'], export_includes=['include'],
                    cflags=['-fPIC'], use=external)
        bld(features='c cshlib', target=name,
            use=[name + '_objs'] + ours + external,
            vnum=VERSION, install_path='${LIBDIR}',
            ldflags=['-Wl,--version-script=' + vscript.abspath(),
                     '-Wl,--no-undefined'])
        # the same objects, for tests that reach internals
        bld(features='c cstlib', target=name + '_static',
            use=[name + '_objs'] + [u + '_static' for u in ours] + external,
            install_path=None)
        bld(features='subst', source='lib/%s/%s.pc.in' % (name, name),
            target='%s.pc' % name, install_path='${LIBDIR}/pkgconfig',
            VERSION=VERSION, PREFIX=bld.env.PREFIX,
            REQUIRES_PRIVATE=' '.join(
                pc for flag, pc in [('HAVE_URING', 'liburing'),
                                    ('HAVE_RDMA', 'libibverbs')]
                if name == 'evpoll' and bld.env[flag]),
            LIBDIR=bld.env.LIBDIR,
            INCLUDEDIR=os.path.join(bld.env.PREFIX, 'include'))
    bld.install_files('${PREFIX}/include', PUBLIC_HEADERS +
                      [h for flag, _, h, _, _ in ADAPTERS
                       if bld.env[flag] and bld.path.find_node(h)])
    bld.install_files('${PREFIX}/share/man/man3',
                      bld.path.ant_glob('man/man3/*.3'))

    # the preload module: evpoll as tevent's default in unmodified programs
    # ($libdir/evproxy/evpoll-preload.so, no 'lib' prefix, no soname)
    penv = bld.env.derive()
    penv.cshlib_PATTERN = '%s.so'
    bld(features='c cshlib', source='preload/evpoll-preload.c',
        target='preload/evpoll-preload', env=penv,
        includes=['include'], use='evpoll TEVENT TALLOC PTHREAD',
        lib=['dl'], rpath=['$ORIGIN/..'],
        ldflags=['-Wl,--no-undefined'],
        install_path='${LIBDIR}/evproxy')

    helper = bld.path.ant_glob('tests/helpers/*.c')
    if helper:
        bld.objects(source=helper, target='test_helpers',
                    includes=['include', 'lib', 'tests'],
                    use='TEVENT TALLOC CMOCKA PTHREAD')
    adapter_uses = [u for flag, _, _, u, _ in ADAPTERS if bld.env[flag]]
    for src in bld.path.ant_glob('tests/test_*.c'):
        if not _wanted(bld.env, src):
            continue
        prog = os.path.splitext(src.name)[0]
        bld.program(source=[src], target='tests/' + prog,
                    includes=['include', 'lib', 'tests'],
                    use=(['test_helpers'] if helper else []) +
                    ['evproxy_static', 'evpoll_static', 'CMOCKA',
                     'TEVENT', 'TALLOC', 'PTHREAD'] + adapter_uses,
                    install_path=None)
        bld.env.append_value('TESTS', ['tests/' + prog])

    bench = [n for n in bld.path.ant_glob('bench/*.c') if _wanted(bld.env, n)]
    if bench:
        bld.program(source=bench, target='evproxy-bench',
                    includes=['include', 'lib', 'bench'],
                    defines=['TEVENT_VERSION="%s"' % bld.env.TEVENT_VERSION] +
                    ['BENCH_URING=1' for n in bench if n.name == 'uring.c'],
                    lib=['m'],
                    # static: the installed program needs no rpath
                    use=['evproxy_static', 'evpoll_static', 'TEVENT',
                         'TALLOC', 'PTHREAD'] + adapter_uses,
                    install_path='${BINDIR}')

    for src in bld.path.ant_glob('examples/*.c'):
        if not _wanted(bld.env, src):
            continue
        prog = os.path.splitext(src.name)[0]
        bld.env.append_value('EXAMPLES', ['examples/' + prog])
        bld.program(source=[src], target='examples/' + prog,
                    includes=['include'],
                    use='evproxy evpoll TEVENT TALLOC PTHREAD',
                    # link libevpoll directly even where the toolchain
                    # defaults to --as-needed: the runpath is not
                    # transitive, libevproxy's own need must be met here
                    linkflags=['-Wl,--no-as-needed'],
                    rpath=['$ORIGIN/..'], install_path=None)

    if bld.cmd == 'test':
        bld.add_post_fun(run_tests)
    if bld.cmd == 'abi-update':
        bld.add_post_fun(abi_update)


# ---------------------------------------------------------------------------
# ABI guard: the exported symbols of each library, per version.

def _exported_symbols(bld, name):
    lib = bld.path.get_bld().find_node('lib%s.so.%s' % (name, VERSION))
    if lib is None:
        raise Errors.WafError('lib%s.so.%s was not built' % (name, VERSION))
    out_ = subprocess.check_output(
        bld.env.NM + ['-D', '--defined-only', lib.abspath()],
        universal_newlines=True)
    syms = set()
    for line in out_.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in 'TDBRVW':
            sym = parts[2].split('@')[0]
            if sym.startswith(name + '_'):
                syms.add(sym)
    return sorted(syms)


def _sigs_path(bld, name):
    return os.path.join(bld.path.abspath(), 'ABI',
                        '%s-%s.sigs' % (name, VERSION))


def abi_check(bld):
    ok = True
    for name, _, _ in LIBRARIES:
        have = _exported_symbols(bld, name)
        path = _sigs_path(bld, name)
        try:
            with open(path) as f:
                want = sorted(l.strip() for l in f if l.strip())
        except IOError:
            want = None
        if want is not None:
            # symbols of adapters this configuration leaves out
            off = [p for flag, _, _, _, p in ADAPTERS if not bld.env[flag]]
            want = [w for w in want
                    if not any(w.startswith(p) for p in off)]
        if want == have:
            continue
        ok = False
        if want is None:
            Logs.error('ABI: %s is missing' % path)
        else:
            for s in sorted(set(have) - set(want)):
                Logs.error('ABI: lib%s exports %s, not in %s'
                           % (name, s, os.path.relpath(path)))
            for s in sorted(set(want) - set(have)):
                Logs.error('ABI: lib%s no longer exports %s, listed in %s'
                           % (name, s, os.path.relpath(path)))
        Logs.error('ABI: if the change is intended, run "make abi-update" '
                   '(and bump VERSION in wscript when a symbol was '
                   'removed), then commit the ABI/ file')
    return ok


def abi_update(bld):
    off = [pfx for flag, pfx, _, _, _ in ADAPTERS if not bld.env[flag]]
    if off:
        raise Errors.WafError('abi-update needs every adapter configured '
                              '(left out: %s)' % ', '.join(off))
    for name, _, _ in LIBRARIES:
        path = _sigs_path(bld, name)
        with open(path, 'w') as f:
            for s in _exported_symbols(bld, name):
                f.write(s + '\n')
        Logs.info('wrote %s' % os.path.relpath(path))


class AbiUpdateContext(Build.BuildContext):
    """build, then rewrite ABI/<lib>-<version>.sigs"""
    cmd = 'abi-update'
    fun = 'build'


# ---------------------------------------------------------------------------
# test: build, check the ABI, run every cmocka program and the benchmark's
# tiny self-check, print 'N passed, N failed'.

class TestContext(Build.BuildContext):
    """build and run every test program"""
    cmd = 'test'
    fun = 'build'


def _run(bld, label, argv, env):
    Logs.info('==== %s' % label)
    sys.stdout.flush()
    try:
        rc = subprocess.call(argv, env=env, cwd=bld.path.get_bld().abspath(),
                             timeout=int(env.get('EVPROXY_TEST_TIMEOUT',
                                                 '900')))
    except subprocess.TimeoutExpired:
        Logs.error('%s: timed out' % label)
        rc = -1
    sys.stdout.flush()
    if rc != 0:
        Logs.error('==== %s FAILED (exit %d)' % (label, rc))
    return rc == 0


def run_tests(bld):
    env = dict(os.environ)
    wrapper = env.get('EVPROXY_TEST_WRAPPER', '').split()
    if bld.env.SANITIZER == 'thread':
        env.setdefault('TSAN_OPTIONS', 'halt_on_error=1 second_deadlock_stack=1')
    if 'address' in bld.env.SANITIZER:
        env.setdefault('ASAN_OPTIONS', 'detect_leaks=1:abort_on_error=0')
        env.setdefault('UBSAN_OPTIONS', 'print_stacktrace=1:halt_on_error=1')
    only = env.get('EVPROXY_TESTS', '').split()

    passed = failed = 0
    results = []
    if not wrapper and not only:
        ok = abi_check(bld)
        results.append(('abi', ok))
    bld_dir = bld.path.get_bld()
    for prog in bld.env.TESTS:
        if only and os.path.basename(prog) not in only:
            continue
        path = bld_dir.find_node(prog).abspath()
        results.append((prog, _run(bld, prog, wrapper + [path], env)))
        if os.path.basename(prog) in FENCE_FALLBACK_TESTS:
            # the same handshakes with seq_cst fences instead of membarrier
            fenv = dict(env, EVPROXY_NO_MEMBARRIER='1')
            results.append((prog + ' (EVPROXY_NO_MEMBARRIER)',
                            _run(bld, prog, wrapper + [path], fenv)))
    for prog in bld.env.EXAMPLES:
        if only:
            break
        results.append(('example ' + prog,
                        _run_example(bld, prog, wrapper, env)))
    bench = bld_dir.find_node('evproxy-bench')
    if bench is not None and not only:
        results.append(('bench --tiny --json',
                        _bench_selfcheck(bld, wrapper + [bench.abspath()],
                                         env)))
    skipped = 0
    if not only:
        results.append(('tevent suite on evpoll',
                        _tevent_suite(bld, wrapper, env)))
    for label, ok in results:
        if ok is None:
            skipped += 1
            Logs.warn('SKIPPED: %s' % label)
        elif ok:
            passed += 1
        else:
            failed += 1
            Logs.error('FAILED: %s' % label)
    print('%d passed, %d failed, %d skipped' % (passed, failed, skipped))
    sys.stdout.flush()
    if failed:
        raise Errors.WafError('%d test(s) failed' % failed)


def _tevent_suite(bld, wrapper, env):
    """tevent's own suites on evpoll (tests/tevent_suite.py): True, False,
    or None when skipped (smbtorture not installed, or a sanitizer or
    valgrind run, whose preload an uninstrumented smbtorture cannot
    load)."""
    label = 'tevent suite on evpoll'
    if wrapper or bld.env.SANITIZER:
        Logs.info('==== %s: skipped in sanitizer and valgrind runs' % label)
        return None
    preload = bld.path.get_bld().find_node('preload/evpoll-preload.so')
    script = bld.path.find_node('tests/tevent_suite.py')
    Logs.info('==== %s' % label)
    sys.stdout.flush()
    rc = subprocess.call([sys.executable, script.abspath(), '--preload',
                          preload.abspath()], env=env)
    if rc == 77:
        Logs.info('==== %s: skipped (make test-tevent installs '
                  'samba-testsuite)' % label)
        return None
    if rc != 0:
        Logs.error('==== %s FAILED (exit %d)' % (label, rc))
    return rc == 0


# Tests run a second time with the fence fallback of lib/asym.c.
FENCE_FALLBACK_TESTS = ['test_messages']


def _run_example(bld, prog, wrapper, env):
    """Smoke-run an example with the arguments its source names in a
    'smoke-args:' line, from the top of the source tree."""
    src = bld.path.find_node(prog + '.c')
    args = []
    for line in src.read().splitlines():
        if 'smoke-args:' in line:
            args = line.split('smoke-args:', 1)[1].split()
            break
    path = bld.path.get_bld().find_node(prog).abspath()
    Logs.info('==== %s %s' % (prog, ' '.join(args)))
    sys.stdout.flush()
    try:
        rc = subprocess.call(wrapper + [path] + args, env=env,
                             cwd=bld.path.abspath(), timeout=600)
    except subprocess.TimeoutExpired:
        rc = -1
    if rc != 0:
        Logs.error('==== %s FAILED (exit %d)' % (prog, rc))
    return rc == 0


def _bench_selfcheck(bld, argv, env):
    import json
    Logs.info('==== evproxy-bench --tiny --json')
    try:
        text = subprocess.check_output(argv + ['--tiny', '--json'], env=env,
                                       universal_newlines=True, timeout=600)
        doc = json.loads(text)
        names = [r['name'] for r in doc['results']]
        for r in doc['results']:
            for key in ('name', 'unit', 'p50', 'p99', 'value', 'ratio',
                        'baseline'):
                if key not in r:
                    raise ValueError('%s lacks %s' % (r.get('name'), key))
        if 'machine' not in doc or not names:
            raise ValueError('no machine or no results')
        print('benchmark scenarios ran: %s' % ' '.join(names))
        return True
    except Exception as e:  # report any failure as a failed test
        Logs.error('evproxy-bench self-check: %s' % e)
        return False
