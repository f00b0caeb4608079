# gen.py SRC_KERNELS_DIR DST_KERNELS_DIR [--only=REGEX]
# Copies the real kernel sources, swapping only the inline-PTX leaf statements
# (mma, ldmatrix, cp.async, ex2) for calls into the host emulator (emu.cpp), and
# routing the sm80 kernel's plain pointer dereferences through emu_deref so that
# shared-memory accesses can be checked against cp.async copies in flight.
# --only keeps just the FA_KERNEL rows whose name matches (the negative control
# builds a few kernels per mutant, not all of them).
import re, shutil, os, sys
src, dst = sys.argv[1], sys.argv[2]
only = None
for a in sys.argv[3:]:
    if a.startswith('--only='): only = re.compile(a[len('--only='):])
    else: sys.exit('gen.py: unknown argument ' + a)
if os.path.exists(dst): shutil.rmtree(dst)
shutil.copytree(src, dst)
def sub(path, fn):
    p = os.path.join(dst, path); s = open(p).read(); t = fn(s)
    assert t != s, path
    open(p, 'w').write(t)
def mma(s):
    def rep(m):
        body = m.group(0)
        ty = 'fa_bf16' if 'bf16.bf16' in body else 'fa_f16'
        return 'emu_mma_16816<%s>(d, a, b0, b1);\n' % ty
    return re.sub(r'asm\("mma\.sync.*?\);\n', rep, s, flags=re.S)
sub('common/mma.cuh', mma)
sub('common/math.cuh', lambda s: re.sub(r'asm\("ex2\.approx.*?\);\n', 'y = emu_ex2(x);\n', s, flags=re.S))
def copy(s):
    s = re.sub(r'asm volatile\("cp\.async\.cg.*?\);\n', 'emu_cp_async_16(dst, src, src_bytes);\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("cp\.async\.ca.*?\);\n', 'emu_cp_async_4(dst, src, src_bytes);\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("cp\.async\.commit_group.*?\);\n', 'emu_cp_async_commit();\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("cp\.async\.wait_group.*?\);\n', 'emu_cp_async_wait(N);\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x4\.shared.*?\);\n', 'emu_ldsm(r, addr, false);\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x4\.trans.*?\);\n', 'emu_ldsm(r, addr, true);\n', s, flags=re.S)
    assert 'asm' not in s.replace('// ', ''), s
    return s
sub('common/copy.cuh', copy)
# An empty asm that only hides a value from the optimiser: nothing to emulate.
sub('common/opaque.cuh', lambda s: s.replace('asm volatile("" : "+r"(x));', ''))

def deref(s):
    # `*reinterpret_cast<T *>(expr)` -> `emu_deref<T>(expr)`, parentheses balanced.
    out, i = [], 0
    while True:
        j = s.find('*reinterpret_cast<', i)
        if j < 0: break
        k = s.index('>', j)
        ty = s[j + len('*reinterpret_cast<'):k].strip()
        assert ty.endswith('*') and s[k + 1] == '(', s[j:j + 80]
        depth, e = 0, k + 1
        while True:
            depth += {'(': 1, ')': -1}.get(s[e], 0)
            if depth == 0: break
            e += 1
        out.append(s[i:j] + 'emu_deref<%s>(%s)' % (ty[:-1].strip(), s[k + 2:e]))
        i = e + 1
    out.append(s[i:])
    t = ''.join(out)
    if 'reinterpret_cast' in t or re.search(r'\bsmem\s*\[', t):
        sys.exit('gen.py: a shared-memory access the emulator cannot check (not *reinterpret_cast<T *>(...))')
    return t
sub('fwd_sm80.cu', lambda s: deref(s.replace('extern __shared__ __align__(128) unsigned char smem[];',
                                             'unsigned char *smem = emu_smem;')))
sub('common/sm80_tile_io.cuh', deref)
# The tiled backward: its shared tile accesses checked like the forward's,
# and its turn counters' acquire load and release add through the emulator.
def bwd(s):
    s = re.sub(r'asm volatile\("ld\.acquire\.gpu.*?\);\n', 'v = emu_ld_acquire(p);\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("red\.release\.gpu.*?\);\n', 'emu_red_release_add1(p);\n', s, flags=re.S)
    # The dQ reductions' sm90 vector form (behind __CUDA_ARCH__ >= 900, never
    # compiled here: the emulator takes the atomicAdd branch beside it).
    s = re.sub(r'asm volatile\("red\.global\.add\.v2\.f32.*?\);\n', 'atomicAdd(p, a); atomicAdd(p + 1, b);\n', s, flags=re.S)
    s = re.sub(r'asm\("mov\.u32 %0, %%dynamic_smem_size.*?\);\n', 'v = emu_dynamic_smem_bytes();\n', s, flags=re.S)
    return deref(s.replace('extern __shared__ __align__(128) unsigned char smem[];', 'unsigned char *smem = emu_smem;'))
sub('bwd_sm80.cu', bwd)
# The naive kernel's static shared arrays become one block of emu_smem per CTA.
sub('fwd_naive.cu', lambda s: re.sub(r'__shared__\s+(\w+)\s+(\w+)\[([^\]]+)\];',
                                     r'\1 *\2 = emu_shared_array<\1>(\3);', s))
assert '__shared__' not in open(os.path.join(dst, 'fwd_naive.cu')).read()

# The emulator's kernel list is each kernel file's own table (variants included).
for kfile, inc in (('fwd_sm80.cu', 'sm80_table.inc'), ('fwd_naive.cu', 'naive_table.inc')):
    text = open(os.path.join(dst, kfile)).read()
    rows = [l for l in text.split('\n') if l.startswith('FA_KERNEL(')]
    keep = [l for l in rows if only is None or only.search(l.split('(')[1].split(',')[0])]
    for l in rows:
        if l not in keep: text = text.replace(l + '\n', '')
    open(os.path.join(dst, kfile), 'w').write(text)
    open(os.path.join(dst, inc), 'w').write('\n'.join(keep) + '\n')
for root, _, files in os.walk(dst):
    for f in files:
        t = open(os.path.join(root, f)).read()
        for m in re.finditer(r'\basm\b', t):
            line = t[:m.start()].count('\n')
            l = t.split('\n')[line]
            if not l.strip().startswith('//') and f in ('fwd_sm80.cu', 'fwd_naive.cu', 'bwd_sm80.cu', 'sm80_frag.cuh', 'copy.cuh', 'mma.cuh', 'softmax.cuh', 'math.cuh', 'swizzle.cuh', 'sm80_tile_io.cuh', 'mask.cuh', 'types.cuh', 'reduce.cuh', 'opaque.cuh'):
                sys.exit('leftover inline asm in %s: %s' % (f, l))
