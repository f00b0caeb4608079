# gen.py SRC_KERNELS_DIR DST_KERNELS_DIR
# Copies the real kernel sources, swapping only the inline-PTX leaf statements
# (mma, ldmatrix, cp.async, ex2) for calls into the host emulator (emu.cpp).
import re, shutil, os, sys
src, dst = sys.argv[1], sys.argv[2]
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
    s = re.sub(r'asm volatile\("cp\.async\.commit_group.*?\);\n', 'emu_cp_async_commit();\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("cp\.async\.wait_group.*?\);\n', 'emu_cp_async_wait(N);\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x4\.shared.*?\);\n', 'emu_ldsm(r, addr, false);\n', s, flags=re.S)
    s = re.sub(r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x4\.trans.*?\);\n', 'emu_ldsm(r, addr, true);\n', s, flags=re.S)
    assert 'asm' not in s.replace('// ', ''), s
    return s
sub('common/copy.cuh', copy)
sub('fwd_sm80.cu', lambda s: s.replace('extern __shared__ __align__(128) unsigned char smem[];', 'unsigned char *smem = emu_smem;'))
# The emulator's kernel list is the kernel file's own table (variants included).
table = [l for l in open(os.path.join(src, 'fwd_sm80.cu')).read().split('\n') if l.startswith('FA_KERNEL(')]
open(os.path.join(dst, 'sm80_table.inc'), 'w').write('\n'.join(table) + '\n')
for root, _, files in os.walk(dst):
    for f in files:
        t = open(os.path.join(root, f)).read()
        for m in re.finditer(r'\basm\b', t):
            line = t[:m.start()].count('\n')
            l = t.split('\n')[line]
            if not l.strip().startswith('//') and f in ('fwd_sm80.cu', 'copy.cuh', 'mma.cuh', 'softmax.cuh', 'math.cuh', 'swizzle.cuh', 'sm80_tile_io.cuh', 'mask.cuh', 'types.cuh'):
                sys.exit('leftover inline asm in %s: %s' % (f, l))
